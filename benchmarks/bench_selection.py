"""Draft quality and training cost per data-selection rule on one scored dataset: SFDD vs random vs all.

    python benchmarks/bench_selection.py [--config configs/smollm2_sharegpt_demo.yaml] [--work DIR]
                                         [--arms sfdd random all] [--keep 0.5]

The experiment of arXiv 2601.18902 at the config's scale. The config's data is scored once
(``flatspec score`` in ``DIR/scored``, with the offline feature cache when ``train.features`` is
``offline``); each arm then gets ``DIR/<arm>`` with those outputs hard-linked in (so no arm scores
again) and runs ``flatspec pipeline`` there with its own selection:

* ``sfdd``: the flattest ``--keep`` of the samples (the paper's SFDD);
* ``random``: a seeded random ``--keep``;
* ``flatness_low``: the least flat ``--keep`` (the paper's inverse ablation);
* ``all``: every sample.

Every arm trains for the same number of epochs over its own data: ``train.steps`` scales with the
trained tokens the arm keeps, relative to the config's own selection at the config's
``train.steps``. All arms share the held-out tail (the last ``data.heldout`` samples of the scores,
never selected) and the MT-bench turns, so held-out agreement, tau and speedup compare directly.
A complete arm directory is reused (the pipeline skips current stages), so an interrupted
benchmark continues. Prints and writes (``benchmarks/results/selection.json``) per arm: samples
and trained tokens kept, steps, training wall time, the held-out agreement curve, tau, per-depth
acceptance and the speedup over autoregressive decoding measured in the same process; then each
arm's tau, speedup and training time relative to ``all``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (REPO, benchmark_parser, child_env, print_table, run_measured, wait_for_quiet,  # noqa: E402
                     write_results)
from collect_demo import stage_times  # noqa: E402

ARMS = ("sfdd", "random", "flatness_low", "all")
SCORED_OUTPUTS = ("scores.parquet", "tokens.npz", "features")
"""What ``flatspec score`` leaves in a run directory that later stages read."""


def flatspec(verb: str, config: str, run_dir: Path, overrides: list[str], log: str) -> Path:
    """Runs one ``flatspec`` verb in ``run_dir`` (logs ``run_dir/<log>.out|err``); returns the stderr log."""
    argv = [sys.executable, "-m", "flatspec_jax.cli", verb, "--config", config, "--run-dir", str(run_dir)]
    for override in overrides:
        argv += ["--set", override]
    return run_measured(argv, child_env(), run_dir / log).check(f"flatspec {verb} in {run_dir}").stderr


def link_scored(scored: Path, run_dir: Path) -> None:
    """Hard-links the scoring outputs of ``scored`` into ``run_dir`` (stages replace files by rename, never
    write into them, so the arms cannot change each other's copies)."""
    for name in SCORED_OUTPUTS:
        source = scored / name
        if not source.exists():
            continue
        for path in [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file()):
            target = run_dir / path.relative_to(scored)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, target)


def trained_tokens(run_dir: Path) -> int:
    """Trained (assistant) tokens of the samples ``run_dir/selection.json`` keeps."""
    return int(json.loads((run_dir / "selection.json").read_text())["summary"]["kept"]["trained_tokens"])


def run_arm(config: str, scored: Path, run_dir: Path, arm: str, keep: float, base_steps: int,
            reference_tokens: int) -> dict:
    """Selects, then runs (or completes) one arm's pipeline with steps scaled to its kept tokens."""
    run_dir.mkdir(parents=True, exist_ok=True)
    link_scored(scored, run_dir)
    selection = [f"select.rule={arm}", f"select.keep={1.0 if arm == 'all' else keep}"]
    flatspec("select", config, run_dir, selection, "select")
    tokens = trained_tokens(run_dir)
    steps = max(1, round(base_steps * tokens / reference_tokens))
    reused = (run_dir / "eval.json").exists()
    log = flatspec("pipeline", config, run_dir, selection + [f"train.steps={steps}"], "pipeline")
    manifest = json.loads((run_dir / "selection.json").read_text())
    evaluation = json.loads((run_dir / "eval.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    curve = [{k: r[k] for k in ("step", "eval_top1", "eval_top3", "eval_acceptance")} for r in records
             if "eval_top1" in r]
    # A reused run's stages were skipped: its stage times are not the arm's cost.
    return {"reused_complete_run": reused, "rule": arm, "keep": manifest["keep"], "samples": manifest["count"],
            "trained_tokens": tokens, "steps": steps, "stage_seconds": stage_times(log), "heldout": curve,
            "eval": {k: v for k, v in evaluation.items() if k != "questions"}}


def main() -> int:
    parser = benchmark_parser(__doc__, "selection.json")
    parser.add_argument("--config", default=str(REPO / "configs" / "smollm2_sharegpt_demo.yaml"))
    parser.add_argument("--work", default=str(REPO / "runs" / "bench_selection"))
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=["sfdd", "random", "all"])
    parser.add_argument("--keep", type=float, default=0.5, help="fraction kept by sfdd, random and flatness_low")
    parser.add_argument("--steps", type=int, help="steps for the config's own selection (default: train.steps)")
    args = parser.parse_args()
    gate = wait_for_quiet(args.max_load, args.max_wait)
    work = Path(args.work)
    scored = work / "scored"
    scored.mkdir(parents=True, exist_ok=True)
    flatspec("score", args.config, scored, [], "score")
    flatspec("select", args.config, scored, [], "select")
    from flatspec_jax.config import load_config

    base_steps = args.steps or load_config(args.config).train.steps
    reference_tokens = trained_tokens(scored)
    results = {"config": args.config, "machine_load": gate, "keep": args.keep, "base_steps": base_steps,
               "reference_trained_tokens": reference_tokens, "arms": {}}
    for arm in args.arms:
        results["arms"][arm] = run_arm(args.config, scored, work / arm, arm, args.keep, base_steps, reference_tokens)
    arms = results["arms"]
    baseline = arms.get("all")
    rows = []
    for name, arm in arms.items():
        last, e = arm["heldout"][-1], arm["eval"]
        relative = ("" if baseline is None else
                    f"{e['tau'] / baseline['eval']['tau']:.2f}x / {e['speedup'] / baseline['eval']['speedup']:.2f}x")
        rows.append([name, arm["samples"], arm["trained_tokens"], arm["steps"],
                     f"{arm['stage_seconds'].get('train', float('nan')) / 60:.1f}", f"{last['eval_top1']:.3f}",
                     f"{last['eval_acceptance']:.3f}", f"{e['tau']:.3f}",
                     ", ".join(f"{a:.2f}" for a in e["per_depth_acceptance"]), f"{e['speedup']:.2f}x", relative])
    print_table(f"draft per selection rule, same epochs ({args.config})",
                ["arm", "samples", "trained tokens", "steps", "train min", "held-out top-1", "held-out acceptance",
                 "tau", "per-depth acceptance", "speedup", "tau / speedup vs all"], rows)
    print(f"wrote {write_results(results, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
