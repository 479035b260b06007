"""``flatspec pipeline``: (regenerate ->) score -> select -> train -> eval -> report in one run directory.

The select stage runs when training reads this run's selection (``data.selection: run``); with a
manifest path or null (all samples) it is skipped and the summary says what training used.

Every stage skips itself when its outputs are current and resumes when it was interrupted,
so re-running the same command after a crash (or after changing a late-stage setting) redoes
only what is missing. The target and tokenizer are loaded once for all stages. A summary is
printed on stdout at the end.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Callable

import jax
import pyarrow.parquet as pq

from flatspec_jax.checkpoint.manager import CHECKPOINT_DIR, holds_trained_steps, read_meta
from flatspec_jax.config import Config
from flatspec_jax.data.prepare import tokens_fingerprint
from flatspec_jax.data.regenerate import responses_are_current
from flatspec_jax.runtime import process_zero_says
from flatspec_jax.scoring import read_fingerprint
from flatspec_jax.selection import SCORES_FILE, SELECTION_FILE, manifest_is_current, read_manifest, select_samples
from flatspec_jax.stages import eval as eval_stage
from flatspec_jax.stages import report, score, select, train
from flatspec_jax.stages.common import RunContext
from flatspec_jax.stages.score import score_fingerprint
from flatspec_jax.train.resume import input_changes, refuse, refuse_imported_head, selection_hash, setting_changes

log = logging.getLogger(__name__)


def summary(cfg: Config, manifest: dict[str, Any] | None, trained: Any, result: dict[str, Any], plots: list,
            responses: dict[str, Any] | None = None) -> str:
    heldout = trained.heldout
    lines = [f"run directory        {cfg.run_dir}"]
    if responses is not None:
        lines.append(f"target replies       {responses['conversations']} conversations, "
                     f"{responses['reply_tokens']:,} tokens ({responses['cut_replies']} cut at "
                     f"{cfg.regenerate.max_new_tokens})")
    left_out = (f"; {trained.left_out} with nothing to train within train.row_length left out"
                if trained.left_out else "")
    if manifest is None:
        lines.append(f"samples kept         all {trained.train_samples + trained.left_out} (data.selection: null; "
                     f"{cfg.data.heldout} held out{left_out})")
    else:
        lines.append(f"samples kept         {manifest['count']} of {manifest['candidates']} ({manifest['rule']}, "
                     f"keep {manifest['keep']:g}; {manifest['heldout']} held out{left_out})")
    lines += [
        f"training tokens      {trained.steps * cfg.train.batch_tokens:,} ({trained.steps} steps x "
        f"{cfg.train.batch_tokens} tokens, {cfg.train.loss} loss, {cfg.train.features} features)",
        "held-out agreement   " + (f"top-1 {heldout['eval_top1']:.3f}, top-3 {heldout['eval_top3']:.3f}, "
                                   f"acceptance {heldout['eval_acceptance']:.3f}" if heldout
                                   else "none (data.heldout=0)"),
        f"{'tau (' + result['method'] + ')':<21}{result['tau']:.2f} tokens per target forward "
        f"({result['drafts_per_round']:.2f} drafts proposed per round)",
        f"speedup              {result['speedup']:.2f}x ({result['tokens_per_s_spec']:.1f} vs "
        f"{result['tokens_per_s_ar']:.1f} tokens/s autoregressive, {result['turns']} "
        f"{'MT-bench turn' if cfg.eval.prompts == 'mtbench' else 'turn'}{'s' if result['turns'] != 1 else ''}"
        f"{'' if cfg.eval.prompts == 'mtbench' else ' of ' + Path(cfg.eval.prompts).name})",
        f"plots                {', '.join(str(p) for p in plots)}",
    ]
    return "\n".join(lines)


def check_training_resumes(cfg: Config, ctx: RunContext) -> None:
    """Refuses, before any stage writes, a run whose training would refuse to resume its checkpoints.

    Training compares its settings, the tokenized samples and the selected ids with the
    checkpoints' (:mod:`flatspec_jax.train.resume`); the stages before it would already have
    rewritten the replies, scores or selection it was trained on. So the samples and the
    selection this config would train on are worked out here without writing anything: from the
    files when they are current, the selection recomputed in memory when only ``select.*``
    changed. Scores that would be recomputed (``score.*`` or the samples changed) give a selection
    that cannot be known before that pass, and are refused too.
    """
    checkpoints = Path(cfg.run_dir) / CHECKPOINT_DIR
    if not process_zero_says(holds_trained_steps(checkpoints)):
        if process_zero_says(checkpoints.is_dir() and (checkpoints / "0").is_dir()):
            refuse_imported_head(checkpoints)
        return
    saved = read_meta(checkpoints)[1]
    changes = setting_changes(saved, cfg) + _input_changes(cfg, ctx, saved)
    if process_zero_says(bool(changes)):
        refuse(checkpoints, changes or ["the inputs process 0 found changed"])


def _input_changes(cfg: Config, ctx: RunContext, saved: dict[str, Any]) -> list[str]:
    run_dir = Path(cfg.run_dir)
    if cfg.data.responses == "target" and not responses_are_current(cfg, ctx.model_path):
        return ["the target's replies, which would be regenerated (regenerate.*, data.* or the model changed)"]
    samples = tokens_fingerprint(cfg.data, ctx.model_path, run_dir)
    changes = input_changes(saved, {"samples": samples}, cfg)
    if changes or cfg.data.selection != "run":
        path = train.selection_path(cfg)
        return changes + input_changes(saved, {"selection": selection_hash(None if path is None else
                                                                          read_manifest(path)["ids"])})
    scores = run_dir / SCORES_FILE
    if read_fingerprint(scores) != score_fingerprint(cfg, samples):
        return ["the scores, which would be recomputed (score.* changed, or scores.parquet is missing): the "
                "selection they give cannot be known before that pass"]
    manifest = run_dir / SELECTION_FILE
    if manifest_is_current(manifest, scores, cfg.select.rule, cfg.select.keep, cfg.seed, cfg.data.heldout):
        ids = read_manifest(manifest)["ids"]
    else:
        ids = select_samples(pq.read_table(scores), cfg.select.rule, cfg.select.keep, cfg.seed, cfg.data.heldout).ids
    return input_changes(saved, {"selection": selection_hash(ids)})


def run(cfg: Config, args: argparse.Namespace | None = None) -> str:
    ctx = RunContext(cfg)
    timings: dict[str, float] = {}

    def timed(name: str, stage: Callable[[], Any]) -> Any:
        log.info("pipeline: %s", name)
        began = time.perf_counter()
        out = stage()
        timings[name] = time.perf_counter() - began
        return out

    check_training_resumes(cfg, ctx)
    eval_stage.load_eval_prompts(cfg, ctx.tokenizer)  # a bad prompts file fails now, not after training
    if cfg.data.responses == "target":
        timed("regenerate", lambda: ctx.responses)
    timed("score", lambda: score.run(cfg, ctx=ctx))
    if cfg.data.selection == "run":
        manifest = timed("select", lambda: select.run(cfg))
    else:  # training reads another run's manifest, or all samples: this run's selection would go unused
        path = train.selection_path(cfg)
        manifest = None if path is None else read_manifest(path)
        log.info("pipeline: select skipped (training reads %s)", "all samples" if path is None else path)
    trained = timed("train", lambda: train.run(cfg, ctx=ctx))
    result = timed("eval", lambda: eval_stage.run(cfg, ctx=ctx))
    plots = timed("report", lambda: report.run(cfg))
    log.info("pipeline finished in %.0f s (%s)", sum(timings.values()),
             ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()))
    text = summary(cfg, manifest, trained, result, plots, ctx.responses)
    if jax.process_index() == 0:  # one summary per job (the others hold no plots)
        print(text)
    return text
