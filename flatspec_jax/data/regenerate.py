"""Target-generated training data (Goel et al., arXiv 2403.00858): the source's user turns, answered by the target.

A draft is asked, at decoding time, to predict the target's own next tokens. Trained on a
dataset's replies (ChatGPT's, for ShareGPT) it sees contexts the target would not write; trained
on the target's replies it sees the target's own. With ``data.responses: target`` every stage
reads these conversations instead of the source's.

Replies are kept as text and tokenized again with the chat template like any source, which is
not always the target's own token sequence: a token the target generated may be read back as
several (SmolLM2's ``'\n\n'`` before a list item as two ``'\n'``), whitespace around a reply is
stripped, and a reply cut at ``regenerate.max_new_tokens`` ends in the end-of-turn token the
target did not write. The draft's targets are the target's distributions on those contexts
either way; only these few contexts differ from what the target wrote.

Each conversation keeps its system message (if any) and its first ``regenerate.turns`` user
turns; the source's replies are not read, so a source of prompts alone (records of user turns)
works as well as a chat dump (records are read as prompts: they need a user turn with text).
Turn t is answered by the target given the earlier user turns and the target's own earlier
replies. A conversation is dropped when its first prompt leaves no room for a reply
within ``data.max_length`` (``prompt_too_long``) or the target's first reply is empty
(``empty_reply``); later turns stop at the first that does not fit or gets an empty reply.

Output, in the run directory:
  * ``responses.jsonl``: one ``{"id", "messages": [{"role", "content"}, ...]}`` line per kept
    conversation, in source order; a JSONL source like any other.
  * ``responses.meta.json``: the fingerprint of everything the replies depend on, the sha256 of
    ``responses.jsonl`` (written after it, and removed before it is rewritten, so replies are
    only current beside their own meta), counts of kept and dropped conversations, generated
    tokens and replies cut at ``max_new_tokens``.
Conversations are decoded in order of first-prompt length (so a batch's prompts pad to a
similar width, and each width bucket compiles once) and written back in source order. Work is
kept in parts (``responses.jsonl.parts/``, one atomically written file per ``flush_every``
batches); an interrupted run resumes at the first missing part, and every batch's sampling key
depends only on its index, so the result equals an uninterrupted run's.
Every process decodes the same batches in lockstep (like ``flatspec eval``); process 0 writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from flatspec_jax.config import Config, ConfigError, DecodeConfig, RegenerateConfig
from flatspec_jax.data.chat import answered_turns, render_prompt
from flatspec_jax.data.conversations import Conversation, SkipReport
from flatspec_jax.data.sources import DataFormatError, iter_conversations
from flatspec_jax.decoding.runner import CACHE_BUCKET, PROMPT_BUCKET, Decoder, round_up
from flatspec_jax.fingerprint import file_sha256, model_identity, source_identity
from flatspec_jax.io import atomic_write, atomic_write_json
from flatspec_jax.models.llama import Llama
from flatspec_jax.runtime import Preempted, process_zero_says, reached_preemption, stop_cause

log = logging.getLogger(__name__)

RESPONSES_FILE = "responses.jsonl"
META_FILE = "responses.meta.json"
PROMPT_TOO_LONG = "prompt_too_long"
EMPTY_REPLY = "empty_reply"


def responses_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RESPONSES_FILE


def _reply_settings(cfg: Config) -> dict[str, Any]:
    """The regenerate settings except ``flush_every``, which only groups batches into part files
    (each batch's sampling key depends on its index alone); greedy replies (temperature 0) draw
    nothing, so their ``top_p`` counts as the default's."""
    settings = {k: v for k, v in dataclasses.asdict(cfg.regenerate).items() if k != "flush_every"}
    if cfg.regenerate.temperature == 0:
        settings["top_p"] = RegenerateConfig.top_p
    return settings


def regenerate_fingerprint(cfg: Config, model_path: str) -> str:
    """What the replies depend on: the target (settings and files), the source's files and how its
    records are read (as prompts), the lengths, the regenerate settings and, for sampled replies, the
    seed (greedy ones are fingerprinted with the default seed: another seed gives the same replies)."""
    seed = cfg.seed if cfg.regenerate.temperature > 0 else Config.seed
    payload = json.dumps({"model": cfg.section_hash("model"), "model_files": model_identity(model_path),
                          "source": source_identity(cfg.data.source), "limit": cfg.data.limit,
                          "max_length": cfg.data.max_length, "records": "prompts",
                          "regenerate": _reply_settings(cfg), "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_meta(run_dir: str | Path) -> dict[str, Any] | None:
    """``responses.meta.json``, or None when it is missing or unreadable."""
    try:
        return json.loads((Path(run_dir) / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def responses_are_current(cfg: Config, model_path: str) -> bool:
    """The meta is this config's and ``responses.jsonl`` is the file it was written with."""
    meta = read_meta(cfg.run_dir)
    path = responses_path(cfg.run_dir)
    return (meta is not None and meta.get("fingerprint") == regenerate_fingerprint(cfg, model_path)
            and path.exists() and meta.get("responses_sha256") == file_sha256(path))


@dataclasses.dataclass(frozen=True)
class _Source:
    """One conversation's parts that regeneration keeps: the system message and the user turns."""

    index: int
    """Position among the conversations answered, in source order."""
    id: str
    system: tuple[dict[str, str], ...]
    user_turns: tuple[str, ...]


def _split(conv: Conversation, index: int, turns: int) -> _Source:
    system = tuple(m.as_dict() for m in conv.messages if m.role == "system")[:1]
    users = tuple(m.content for m in conv.messages if m.role == "user")[:turns]
    return _Source(index, conv.id, system, users)


def _messages(source: _Source, replies: Sequence[str], asking: bool) -> list[dict[str, str]]:
    """The system message and the user turns answered by ``replies``, plus the next user turn if ``asking``."""
    return list(source.system) + answered_turns(source.user_turns[:len(replies) + int(asking)], replies)


def _prompt(tokenizer, source: _Source, replies: Sequence[str]) -> np.ndarray:
    """[P] ids of the prompt for user turn ``len(replies)``: earlier turns answered by ``replies``."""
    return render_prompt(tokenizer, _messages(source, replies, asking=True))


class _Regenerator:
    """Decodes batches of conversations turn by turn: a fixed number of rows, prompts padded to
    their bucket (``PROMPT_BUCKET``), so one compiled program per width bucket."""

    def __init__(self, cfg: Config, target: Llama, tokenizer, eos_ids: Sequence[int], pad_id: int):
        self.cfg = cfg
        self.tokenizer = tokenizer
        settings = cfg.regenerate
        widest = round_up(cfg.data.max_length, PROMPT_BUCKET)
        decode = DecodeConfig(method="ar", temperature=settings.temperature, top_p=settings.top_p,
                              max_new_tokens=settings.max_new_tokens,
                              max_cache_length=round_up(widest + settings.max_new_tokens + 1, CACHE_BUCKET))
        self.decoder = Decoder(target, decode, eos_ids, pad_id, method="ar")

    def fits(self, prompt: np.ndarray) -> bool:
        """A reply token still fits within data.max_length after the prompt."""
        return len(prompt) < self.cfg.data.max_length

    def batch(self, sources: Sequence[_Source], key: jax.Array) -> list[dict[str, Any]]:
        """One record per source: ``{"index", "id", "messages", "reply_tokens", "cut"}`` or
        ``{"index", "id", "dropped"}``."""
        replies: list[list[str]] = [[] for _ in sources]
        tokens: list[list[int]] = [[] for _ in sources]
        cut = [0] * len(sources)
        open_rows = list(range(len(sources)))
        for turn in range(self.cfg.regenerate.turns):
            prompts = {}
            for row in open_rows:
                if turn < len(sources[row].user_turns):
                    prompt = _prompt(self.tokenizer, sources[row], replies[row])
                    if self.fits(prompt):
                        prompts[row] = prompt
            if not prompts:
                break
            rows = list(prompts)
            # Fill the batch with copies of its first prompt: every call has the same shape.
            padded = [prompts[r] for r in rows] + [prompts[rows[0]]] * (self.cfg.regenerate.batch_size - len(rows))
            result = self.decoder.run(padded, jax.random.fold_in(key, turn))
            open_rows = []
            for row, ids in zip(rows, result.tokens):
                text = self.decoder.text(self.tokenizer, ids)
                if not text:
                    continue
                replies[row].append(text)
                tokens[row].append(len(ids))
                capped = len(ids) == self.cfg.regenerate.max_new_tokens
                cut[row] += int(capped and int(ids[-1]) not in self.decoder.eos_ids)
                open_rows.append(row)
        records = []
        for source, row_replies, row_tokens, row_cut in zip(sources, replies, tokens, cut):
            if not row_replies:
                records.append({"index": source.index, "id": source.id, "dropped": EMPTY_REPLY})
                continue
            records.append({"index": source.index, "id": source.id, "messages": _messages(source, row_replies, False),
                            "reply_tokens": row_tokens, "cut": row_cut})
        return records


def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            try:
                yield json.loads(line)
            except ValueError as err:
                raise DataFormatError(f"{path}:{number}: not a JSON record ({err}); delete the file and run "
                                      "the same command again") from None


def _part_is_whole(path: Path, rows: int) -> bool:
    """Part ``path`` holds ``rows`` JSON records (one per conversation of its batches): not missing or damaged."""
    try:
        records = list(_read_jsonl(path))
    except (OSError, ValueError):
        return False
    return len(records) == rows and all(isinstance(r, dict) and "index" in r for r in records)


def _parts_dir(run_dir: Path, fingerprint: str) -> Path:
    """The parts directory of this fingerprint; parts of other settings are removed."""
    parts = run_dir / (RESPONSES_FILE + ".parts")
    stamp = parts / "FINGERPRINT"
    if jax.process_index() == 0:  # the others wait at the caller's barrier
        if parts.exists() and (not stamp.exists() or stamp.read_text() != fingerprint):
            log.info("removing %d parts of replies made with other settings from %s", len(list(parts.glob("part-*"))),
                     parts)
            shutil.rmtree(parts)
        if not stamp.exists():
            parts.mkdir(parents=True, exist_ok=True)
            atomic_write(stamp, lambda tmp: tmp.write_text(fingerprint))
    return parts


def regenerate(cfg: Config, target: Llama, tokenizer, eos_ids: Sequence[int], pad_id: int,
               model_path: str) -> dict[str, Any]:
    """Writes ``responses.jsonl`` and ``responses.meta.json`` (module docstring) unless they are current.

    Returns:
      The meta record: fingerprint, conversations (kept), dropped (by reason), reply_tokens,
      cut_replies (replies that reached ``regenerate.max_new_tokens``).
    """
    run_dir = Path(cfg.run_dir)
    fingerprint = regenerate_fingerprint(cfg, model_path)
    if process_zero_says(responses_are_current(cfg, model_path)):
        log.info("%s is current; nothing to do", responses_path(run_dir))
        return read_meta(run_dir)
    settings = cfg.regenerate
    worker = _Regenerator(cfg, target, tokenizer, eos_ids, pad_id)
    report = SkipReport()
    sources, first_lengths, too_long = [], [], 0
    for conv in iter_conversations(cfg.data.source, report, cfg.data.limit, replies=False):
        source = _split(conv, len(sources), settings.turns)
        first = _prompt(tokenizer, source, [])
        if worker.fits(first):
            sources.append(source)
            first_lengths.append(len(first))
        else:
            too_long += 1
    log.info("%s: %s; %d conversations to answer, %d dropped (first prompt >= data.max_length=%d tokens)",
             cfg.data.source, report.summary(), len(sources), too_long, cfg.data.max_length)
    if not sources:
        raise ConfigError(f"data.source={cfg.data.source!r} has no conversation to answer: {too_long} first prompts "
                          f">= data.max_length={cfg.data.max_length}; records: {report.summary()}")
    # Parts are chunks of flush_every batches: they count only for the chunking they were cut with.
    parts = _parts_dir(run_dir, f"{fingerprint}/flush_every={settings.flush_every}")
    multihost_utils.sync_global_devices("flatspec: regenerate parts checked")
    order = [sources[i] for i in np.argsort(first_lengths, kind="stable")]
    num_batches = -(-len(sources) // settings.batch_size)
    chunk_starts = range(0, num_batches, settings.flush_every)
    chunk_rows = {start: min(settings.flush_every * settings.batch_size, len(sources) - start * settings.batch_size)
                  for start in chunk_starts}
    written = process_zero_says([_part_is_whole(parts / f"part-{start:06d}.jsonl", chunk_rows[start])
                                 for start in chunk_starts])
    damaged = [start for start, whole in zip(chunk_starts, written)
               if not whole and (parts / f"part-{start:06d}.jsonl").exists()]
    if damaged and jax.process_index() == 0:
        log.warning("redoing %d damaged part(s) in %s, from part-%06d.jsonl", len(damaged), parts, damaged[0])
    done = {start for start, whole in zip(chunk_starts, written) if whole}
    if done:
        log.info("resuming: %d of %d parts already written", len(done), len(chunk_starts))
    key = jax.random.key(cfg.seed)
    finished_rows = sum(chunk_rows[start] for start in done)
    progress = tqdm(total=len(sources), initial=finished_rows, unit="conversation", desc="regenerate",
                    file=sys.stderr, disable=jax.process_index() != 0, mininterval=5)
    began, generated = time.perf_counter(), 0
    for start in chunk_starts:
        if reached_preemption():  # the parts before this chunk are written
            progress.close()
            raise Preempted(f"{stop_cause()} while regenerating: the parts written so far are kept in {parts}; "
                            "the same command resumes from them")
        if start in done:
            continue
        records = []
        for index in range(start, min(start + settings.flush_every, num_batches)):
            batch = order[index * settings.batch_size:(index + 1) * settings.batch_size]
            batch_records = worker.batch(batch, jax.random.fold_in(key, index))
            records += batch_records
            generated += sum(sum(r.get("reply_tokens", ())) for r in batch_records)
            progress.update(len(batch))
            progress.set_postfix(tok_s=f"{generated / (time.perf_counter() - began):.0f}")
        if jax.process_index() == 0:
            _write_jsonl(parts / f"part-{start:06d}.jsonl", records)
    progress.close()
    multihost_utils.sync_global_devices("flatspec: regenerate parts written")
    if jax.process_index() == 0:
        _merge(run_dir, parts, chunk_starts, fingerprint, too_long)
    multihost_utils.sync_global_devices("flatspec: responses written")
    meta = read_meta(run_dir)
    log.info("wrote %s: %d conversations, %d reply tokens (%d replies cut at %d tokens), dropped %s",
             responses_path(run_dir), meta["conversations"], meta["reply_tokens"], meta["cut_replies"],
             settings.max_new_tokens, meta["dropped"])
    return meta


def _merge(run_dir: Path, parts: Path, chunk_starts: range, fingerprint: str, too_long: int) -> None:
    """Gathers the parts into responses.jsonl in source order, then writes the meta record and removes the parts."""
    kept, dropped = [], {PROMPT_TOO_LONG: too_long, EMPTY_REPLY: 0}
    for start in chunk_starts:
        for record in _read_jsonl(parts / f"part-{start:06d}.jsonl"):
            if "dropped" in record:
                dropped[record["dropped"]] += 1
            else:
                kept.append(record)
    kept.sort(key=lambda r: r["index"])
    (run_dir / META_FILE).unlink(missing_ok=True)  # never an old meta beside new replies
    _write_jsonl(responses_path(run_dir), [{"id": r["id"], "messages": r["messages"]} for r in kept])
    atomic_write_json(run_dir / META_FILE, {
        "fingerprint": fingerprint, "responses_sha256": file_sha256(responses_path(run_dir)),
        "conversations": len(kept), "dropped": dropped,
        "reply_tokens": sum(sum(r["reply_tokens"]) for r in kept), "cut_replies": sum(r["cut"] for r in kept)})
    shutil.rmtree(parts)
