"""Shared parts of the benchmarks that compare whole pipeline runs ("arms") on one scored dataset.

The config's data is scored once in ``WORK/scored``; each arm's run directory gets those outputs
hard-linked in (stages replace files by rename and never write into them, so arms cannot change
each other's copies) and runs ``flatspec pipeline`` with its own overrides. A complete arm
directory is reused (the pipeline skips current stages), so an interrupted or extended benchmark
continues.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from _common import REPO, benchmark_parser, child_env, print_table, run_measured
from collect_demo import stage_times

SCORED_OUTPUTS = ("scores.parquet", "tokens.npz", "features")
"""What ``flatspec score`` leaves in a run directory that later stages read."""
SELECTED_OUTPUTS = SCORED_OUTPUTS + ("selection.json",)
"""... and ``flatspec select``."""
TRAINED_OUTPUTS = SELECTED_OUTPUTS + ("checkpoints",)
"""... and ``flatspec train``: what ``flatspec eval`` reads."""


def flatspec(verb: str, config: str, run_dir: Path, overrides: list[str], log: str) -> Path:
    """Runs one ``flatspec`` verb in ``run_dir`` (logs ``run_dir/<log>.out|err``); returns the stderr log."""
    argv = [sys.executable, "-m", "flatspec_jax.cli", verb, "--config", config, "--run-dir", str(run_dir)]
    for override in overrides:
        argv += ["--set", override]
    return run_measured(argv, child_env(), run_dir / log).check(f"flatspec {verb} in {run_dir}").stderr


def arms_parser(doc: str, results_name: str, work_name: str) -> argparse.ArgumentParser:
    """:func:`benchmark_parser` with the options every arms benchmark takes: --config, --work, --set."""
    parser = benchmark_parser(doc, results_name)
    parser.add_argument("--config", default=str(REPO / "configs" / "smollm2_sharegpt_demo.yaml"))
    parser.add_argument("--work", default=str(REPO / "runs" / work_name))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every arm (repeatable)")
    return parser


def score_and_select(config: str, work: Path, overrides: list[str]) -> Path:
    """``flatspec score`` and ``select`` once, in ``work/scored`` (skipped when current); returns that folder."""
    scored = work / "scored"
    scored.mkdir(parents=True, exist_ok=True)
    flatspec("score", config, scored, overrides, "score")
    flatspec("select", config, scored, overrides, "select")
    return scored


def link_outputs(source_dir: Path, run_dir: Path, names: tuple[str, ...] = SCORED_OUTPUTS) -> None:
    """Hard-links the files (and folders' files) ``names`` of ``source_dir`` into ``run_dir``, where absent."""
    for name in names:
        source = source_dir / name
        if not source.exists():
            continue
        for path in [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file()):
            target = run_dir / path.relative_to(source_dir)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, target)


def _attempt_logs(run_dir: Path) -> list[Path]:
    """The stderr logs of the pipeline runs that did work in ``run_dir``: ``pipeline.err``, then
    ``pipeline-2.err``, ... for runs that continued one cut off before it finished."""
    logs = [p for p in run_dir.glob("pipeline*.err") if re.fullmatch(r"pipeline(-\d+)?\.err", p.name)]
    return sorted(logs, key=lambda p: int(p.stem.partition("-")[2] or 1))


def run_arm_pipeline(config: str, run_dir: Path, overrides: list[str]) -> dict:
    """Runs (or completes) ``flatspec pipeline`` in ``run_dir``; returns its outcome: stage wall times,
    the held-out agreement at every evaluated step (empty with ``data.heldout=0``), and eval.json's
    summary (per-question records dropped).

    A run that was complete before (``eval.json`` present) is run again only to confirm it is
    current; that check logs to ``pipeline-check.*``, so the stage times stay those of the runs
    that did the work (``reused_complete_run`` says so). A run cut off before it finished is
    continued with its log in ``pipeline-<n>.*``, and each stage's time adds up over the
    ``attempts``.
    """
    attempts = _attempt_logs(run_dir)
    reused = (run_dir / "eval.json").exists() and bool(attempts)
    flatspec("pipeline", config, run_dir, overrides,
             "pipeline-check" if reused else "pipeline" if not attempts else f"pipeline-{len(attempts) + 1}")
    attempts = _attempt_logs(run_dir)
    stage_seconds: dict[str, float] = {}
    for log in attempts:
        for stage, seconds in stage_times(log).items():
            stage_seconds[stage] = stage_seconds.get(stage, 0.0) + seconds
    evaluation = json.loads((run_dir / "eval.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    curve = [{k: r[k] for k in ("step", "eval_top1", "eval_top3", "eval_acceptance", "eval_loss")} for r in records
             if "eval_top1" in r]
    return {"reused_complete_run": reused, "attempts": len(attempts), "stage_seconds": stage_seconds,
            "heldout": curve, "eval": {k: v for k, v in evaluation.items() if k != "questions"}}


def run_selected_arm(config: str, selected: Path, run_dir: Path, overrides: list[str]) -> dict:
    """:func:`run_arm_pipeline` in ``run_dir`` on the scored and selected data of ``selected`` (linked in)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    link_outputs(selected, run_dir, SELECTED_OUTPUTS)
    return run_arm_pipeline(config, run_dir, overrides)


def evaluate_arm(config: str, arm_dir: Path, suffix: str, overrides: list[str]) -> dict:
    """The arm's trained head evaluated again (``flatspec eval`` with ``overrides``, e.g. other decoding
    settings) in ``<arm_dir>-<suffix>``, the arm's outputs linked in: eval.json's summary (per-question
    records dropped)."""
    run_dir = arm_dir.with_name(f"{arm_dir.name}-{suffix}")
    run_dir.mkdir(parents=True, exist_ok=True)
    link_outputs(arm_dir, run_dir, TRAINED_OUTPUTS)
    flatspec("eval", config, run_dir, overrides, "eval")
    evaluation = json.loads((run_dir / "eval.json").read_text())
    return {k: v for k, v in evaluation.items() if k != "questions"}


def last_heldout_cells(arm: dict) -> list[str]:
    """The last held-out evaluation's top-1 and acceptance ("-" with ``data.heldout=0``)."""
    if not arm["heldout"]:
        return ["-", "-"]
    last = arm["heldout"][-1]
    return [f"{last['eval_top1']:.3f}", f"{last['eval_acceptance']:.3f}"]


def outcome_cells(arm: dict) -> list[str]:
    """Table cells of :func:`run_arm_pipeline`'s outcome: train minutes, last held-out top-1 and acceptance, tau,
    per-depth acceptance, speedup."""
    e = arm["eval"]
    per_depth = ", ".join(f"{a:.2f}" for a in e["per_depth_acceptance"])
    return [f"{arm['stage_seconds'].get('train', float('nan')) / 60:.1f}", *last_heldout_cells(arm),
            f"{e['tau']:.3f}", per_depth, f"{e['speedup']:.2f}x"]


def relative(arm: dict, baseline: dict | None) -> dict[str, float | None] | None:
    """``arm``'s tau, speedup and training wall time over ``baseline``'s (None without a baseline; the
    training time None when either run's log has no train stage)."""
    if baseline is None:
        return None
    e, b = arm["eval"], baseline["eval"]
    arm_train, base_train = arm["stage_seconds"].get("train"), baseline["stage_seconds"].get("train")
    train = arm_train / base_train if arm_train is not None and base_train else None
    return {"tau": e["tau"] / b["tau"], "speedup": e["speedup"] / b["speedup"], "train_time": train}


RELATIVE_HEADER = "tau / speedup / train time vs"


def relative_cell(arm: dict, baseline: dict | None) -> str:
    """:func:`relative` as one cell ("1.02x / 0.98x / 0.51x"; empty without a baseline)."""
    ratios = relative(arm, baseline)
    if ratios is None:
        return ""
    return " / ".join("-" if ratios[k] is None else f"{ratios[k]:.2f}x" for k in ("tau", "speedup", "train_time"))


OUTCOME_HEADER = ["train min", "held-out top-1", "held-out acceptance", "tau", "per-depth acceptance", "speedup"]


def print_evaluations(title: str, arm_label: str, evaluations: dict[str, dict]) -> None:
    """A table of each arm's extra evaluation (:func:`evaluate_arm`): tau, per-depth acceptance, speedup."""
    rows = [[name, f"{e['tau']:.3f}", ", ".join(f"{a:.2f}" for a in e["per_depth_acceptance"]),
             f"{e['speedup']:.2f}x"] for name, e in evaluations.items()]
    print_table(title, [arm_label, "tau", "per-depth acceptance", "speedup"], rows)
