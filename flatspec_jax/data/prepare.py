"""The run's tokenized samples: conversations -> chat template + loss mask -> ``tokens.npz``.

Built once per run directory and reused by every stage (scoring, selection, training,
held-out metrics), so they agree on each sample's tokens by construction. Samples whose
kept tokens contain no assistant token (a long first user turn cut by ``max_length``)
cannot train a draft and are dropped here, with a count in the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import jax

from flatspec_jax.config import DataConfig
from flatspec_jax.data.chat import tokenize_conversations
from flatspec_jax.data.sources import DataFormatError, iter_conversations
from flatspec_jax.data.conversations import SkipReport
from flatspec_jax.data.regenerate import read_meta, responses_path
from flatspec_jax.data.tokenized import TokenizedDataset
from flatspec_jax.fingerprint import model_identity, source_identity

log = logging.getLogger(__name__)

TOKENS_FILE = "tokens.npz"


def conversations_source(data: DataConfig, run_dir: Path) -> str:
    """Where the training conversations are read: ``data.source``, or with ``data.responses: target``
    the run's ``responses.jsonl`` (``flatspec regenerate``)."""
    if data.responses == "source":
        return data.source
    _responses_meta(run_dir)
    return str(responses_path(run_dir))


def _responses_meta(run_dir: Path) -> dict:
    """``responses.meta.json`` of the run's target replies.

    Raises:
      FileNotFoundError: naming the file and the command when the replies have not been generated.
    """
    path, meta = responses_path(run_dir), read_meta(run_dir)
    if meta is None or not path.exists():
        raise FileNotFoundError(f"data.responses=target but {path} is missing: run `flatspec regenerate` "
                                "(or `flatspec pipeline`) first")
    return meta


def tokens_fingerprint(data: DataConfig, model_path: str, run_dir: Path) -> str:
    """What the tokenized samples depend on: the conversations (the source's files by content, or the
    run's target replies by their fingerprint), the limit, the max length and the tokenizer's files."""
    responses = None if data.responses == "source" else _responses_meta(run_dir)["fingerprint"]
    source = source_identity(data.source) if responses is None else None
    payload = json.dumps({"source": source, "responses": responses, "limit": data.limit,
                          "max_length": data.max_length, "tokenizer": model_identity(model_path)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def prepare_samples(data: DataConfig, model_path: str, tokenizer, run_dir: Path) -> TokenizedDataset:
    """Loads ``run_dir/tokens.npz`` if it was built from the same settings, else builds and saves it.

    Every process builds the same samples (the work is deterministic); only process 0 writes.
    """
    path = run_dir / TOKENS_FILE
    source = conversations_source(data, run_dir)
    fingerprint = tokens_fingerprint(data, model_path, run_dir)
    cached = TokenizedDataset.load(path, fingerprint)
    if cached is not None:
        log.info("using %d tokenized samples from %s", len(cached), path)
        return cached
    report = SkipReport()
    conversations = iter_conversations(source, report, data.limit)
    kept, untrainable = [], 0
    for sample in tokenize_conversations(tokenizer, conversations, data.max_length):
        if sample.n_trained == 0:
            untrainable += 1
            continue
        kept.append((sample.id, sample.input_ids, sample.loss_mask, sample.truncated))
    report.log_summary(source)
    if untrainable:
        log.info("dropped %d samples with no assistant token within data.max_length=%d", untrainable,
                 data.max_length)
    if not report.kept:  # the reason is the records', not the settings'
        raise DataFormatError(f"{source}: no usable conversation: {report.summary()}")
    if not kept:
        raise DataFormatError(f"{source} gave no sample with an assistant token "
                              f"(data.limit={data.limit}, data.max_length={data.max_length})")
    _check_unique_ids(source, [sample_id for sample_id, *_ in kept])
    dataset = TokenizedDataset.from_samples(kept, fingerprint)
    if jax.process_index() == 0:
        dataset.save(path)
    log.info("tokenized %d samples (%d tokens, %d truncated)", len(dataset), len(dataset.tokens),
             int(dataset.truncated.sum()))
    return dataset


def _check_unique_ids(source: str, ids: list[str]) -> None:
    """Scores, selection manifests and the training filter address samples by id: refuse a repeat
    before the scoring pass rather than after it."""
    first: dict[str, int] = {}
    for index, sample_id in enumerate(ids):
        if sample_id in first:
            raise DataFormatError(f"{source}: samples {first[sample_id]} and {index} have the same id {sample_id!r}; "
                             "give every record a distinct 'id'")
        first[sample_id] = index
