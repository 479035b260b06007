"""``flatspec eval``: speculative vs autoregressive decoding on MT-bench (or a JSONL of prompts)
-> ``eval.json`` and the acceptance-by-depth plot."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import jax

from flatspec_jax.checkpoint.manager import read_meta
from flatspec_jax.config import Config
from flatspec_jax.data.prepare import tokens_fingerprint
from flatspec_jax.data.prompts import Prompt, load_prompts
from flatspec_jax.data.sources import DataFormatError
from flatspec_jax.decoding.runner import Decoder
from flatspec_jax.evaluation import evaluate, turn_prompt
from flatspec_jax.fingerprint import file_identity, model_identity
from flatspec_jax.io import atomic_write_json
from flatspec_jax.runtime import process_zero_says
from flatspec_jax.stages.common import CHECKPOINT_DIR, RunContext, arg, target_path
from flatspec_jax.stages.report import PLOTS_DIR, eval_plots

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"


def _fingerprint(cfg: Config, checkpoint: Path, step: int, meta: dict[str, Any]) -> str:
    # The target counts by its files' contents and the model.* settings other than the path. The run's
    # samples and the held-out count (the vocabulary is counted before the held-out tail) count only when
    # they make the draft vocabulary (decode.draft_vocab; one the head was trained on, draft.vocab, is
    # part of the checkpoint). The checkpoint's metadata (its training config
    # and inputs) tells a retrained head at the same path and step from the one evaluated.
    # The prompts file counts by content (edited in place, it is other prompts); the checkpoint by its
    # place in the run directory, so a moved run stays current.
    model = target_path(cfg)
    samples = (f"{tokens_fingerprint(cfg.data, model, Path(cfg.run_dir))}/{cfg.data.heldout}"
               if cfg.decode.draft_vocab else "-")
    trained = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    prompts = "mtbench" if cfg.eval.prompts == "mtbench" else file_identity(cfg.eval.prompts)[:16]
    place = checkpoint.resolve()
    if place.is_relative_to(Path(cfg.run_dir).resolve()):
        place = place.relative_to(Path(cfg.run_dir).resolve())
    return (f"{cfg.section_hash('model', 'decode', 'eval', 'seed')}:{model_identity(model)[:16]}:{samples}:"
            f"{prompts}:{place}:{step}:{trained}")


def eval_is_current(cfg: Config, checkpoint: Path) -> bool:
    """True when eval.json was made with these settings from the checkpoint's latest step."""
    path = Path(cfg.run_dir) / EVAL_FILE
    try:
        step, meta = read_meta(checkpoint)
        return json.loads(path.read_text())["fingerprint"] == _fingerprint(cfg, checkpoint, step, meta)
    except (OSError, ValueError, KeyError):
        return False


def load_eval_prompts(cfg: Config, tokenizer) -> list[Prompt]:
    """``eval.prompts`` as evaluation reads them, refused before any model loads when the file cannot be read
    or a first turn leaves no cache slot for a new token (a later turn, which holds the replies before it, is
    checked when it is reached).

    Raises:
      DataFormatError: naming the file (and line) or the prompt and its length.
    """
    prompts = load_prompts(cfg.eval.prompts, cfg.eval.limit, cfg.eval.turns)
    for prompt in prompts:
        length = len(turn_prompt(tokenizer, prompt, []))
        if length >= cfg.decode.max_cache_length:
            source = "MT-bench" if cfg.eval.prompts == "mtbench" else cfg.eval.prompts
            raise DataFormatError(f"{source}: prompt {prompt.id!r} is {length} tokens in the chat template, leaving "
                                  f"no room for a new token in decode.max_cache_length={cfg.decode.max_cache_length}")
    return prompts


def summary_line(result: dict[str, Any]) -> str:
    skipped = len(result.get("skipped_turns", []))  # eval.json files written before the key existed lack it
    return (f"tau {result['tau']:.2f} tokens per target forward ({result['drafts_per_round']:.2f} drafts proposed "
            f"per round), speedup {result['speedup']:.2f}x "
            f"({result['tokens_per_s_spec']:.1f} vs {result['tokens_per_s_ar']:.1f} tokens/s autoregressive) "
            f"over {result['turns']} turn{'s' if result['turns'] != 1 else ''}"
            + (f"; {skipped} later turn(s) too long for decode.max_cache_length not decoded" if skipped else ""))


def run(cfg: Config, args: argparse.Namespace | None = None, ctx: RunContext | None = None) -> dict[str, Any]:
    ctx = ctx or RunContext(cfg)
    checkpoint = Path(arg(args, "draft", ctx.run_dir / CHECKPOINT_DIR))
    path = ctx.run_dir / EVAL_FILE
    # Every process takes process 0's branch, and all read the checkpoint or none (opening it is a collective).
    if process_zero_says(checkpoint.is_dir()) and process_zero_says(eval_is_current(cfg, checkpoint)):
        log.info("%s is current; nothing to do", path)
        return json.loads(path.read_text())
    prompts = load_eval_prompts(cfg, ctx.tokenizer)  # a bad file fails before the models load
    if not cfg.eval.warmup:
        log.warning("eval.warmup=0: the first batch of each turn is timed with its compilation, so tokens/s "
                    "and the speedup understate both decoders")
    step, meta = read_meta(checkpoint)
    method = cfg.decode.method if cfg.decode.method != "ar" else "tree"
    head = ctx.draft_head(checkpoint)
    eos, pad = ctx.eos_ids(), ctx.pad_id()
    ar = Decoder(ctx.decoding_target, cfg.decode, eos, pad, method="ar")
    draft_ids = ctx.decoding_draft_ids(checkpoint)
    spec = Decoder(ctx.decoding_target, cfg.decode, eos, pad, head=head, method=method, draft_ids=draft_ids)
    log.info("evaluating %s decoding (draft %s step %d) on %d prompts x %d turn(s)", method, checkpoint, step,
             len(prompts), cfg.eval.turns)
    result = evaluate(prompts, ctx.tokenizer, ar, spec, warmup=cfg.eval.warmup, seed=cfg.seed,
                      batch_size=cfg.eval.batch_size)
    result.update({"method": method, "temperature": cfg.decode.temperature, "batch_size": cfg.eval.batch_size,
                   "warmup": cfg.eval.warmup,
                   "draft_vocab": 0 if draft_ids is None else len(draft_ids), "checkpoint": str(checkpoint),
                   "step": step, "fingerprint": _fingerprint(cfg, checkpoint, step, meta)})
    if jax.process_index() == 0:
        atomic_write_json(path, result)
        eval_plots(path, ctx.run_dir / PLOTS_DIR)
    log.info("eval: %s", summary_line(result))
    return result
