"""Draft quality from the dataset's replies vs the target's own (``data.responses``), same run otherwise.

    python benchmarks/bench_responses.py [--config configs/smollm2_sharegpt_demo.yaml] [--work DIR]
        [--set KEY=VALUE ...]

Runs ``flatspec pipeline`` twice on one config, once with ``data.responses=source`` (the
baseline: ShareGPT's ChatGPT replies) and once with ``data.responses=target`` (the source's
user turns answered by the target, arXiv 2403.00858), in ``DIR/source`` and ``DIR/target``,
each with the ``--set`` overrides. A run directory that is already complete is reused (the
pipeline skips current stages), so an interrupted benchmark continues. Prints and writes
(``benchmarks/results/responses.json``) per side: the held-out draft agreement curve (each
side's own held-out samples), the MT-bench tau, per-depth acceptance and speedup over
autoregressive decoding measured in the same process, and the stage wall times; then the
target/source ratios of tau and speedup.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _arms import arms_parser  # noqa: E402
from _common import child_env, print_table, run_measured, wait_for_quiet, write_results  # noqa: E402
from collect_demo import stage_times  # noqa: E402

SIDES = ("source", "target")


def run_side(config: str, run_dir: Path, responses: str, overrides: list[str]) -> dict:
    """Runs (or completes) one pipeline and reads back what it measured."""
    run_dir.mkdir(parents=True, exist_ok=True)
    reused = (run_dir / "eval.json").exists()
    argv = [sys.executable, "-m", "flatspec_jax.cli", "pipeline", "--config", config, "--run-dir", str(run_dir),
            "--set", f"data.responses={responses}"]
    for override in overrides:
        argv += ["--set", override]
    done = run_measured(argv, child_env(), run_dir / "pipeline").check(f"pipeline ({responses} replies)")
    evaluation = json.loads((run_dir / "eval.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    curve = [{k: r[k] for k in ("step", "eval_top1", "eval_top3", "eval_acceptance")} for r in records
             if "eval_top1" in r]
    # A reused run's stages were skipped: its wall and stage times are not the pipeline's cost.
    side = {"reused_complete_run": reused, "wall_s": round(done.wall_s, 1), "stage_seconds": stage_times(done.stderr),
            "heldout": curve,
            "eval": {k: v for k, v in evaluation.items() if k != "questions"}}
    meta = run_dir / "responses.meta.json"
    if meta.exists():
        side["responses"] = json.loads(meta.read_text())
    return side


def main() -> int:
    args = arms_parser(__doc__, "responses.json", "bench_responses").parse_args()
    gate = wait_for_quiet(args.max_load, args.max_wait)
    results = {"config": args.config, "overrides": args.overrides, "machine_load": gate}
    for responses in SIDES:
        results[responses] = run_side(args.config, Path(args.work) / responses, responses, args.overrides)
    rows = []
    for responses in SIDES:
        side = results[responses]
        last = side["heldout"][-1]
        e = side["eval"]
        rows.append([responses, f"{last['eval_top1']:.3f}", f"{last['eval_acceptance']:.3f}", f"{e['tau']:.2f}",
                     ", ".join(f"{a:.2f}" for a in e["per_depth_acceptance"]), f"{e['tokens_per_s_ar']:.1f}",
                     f"{e['tokens_per_s_spec']:.1f}", f"{e['speedup']:.2f}x"])
    print_table(f"draft trained on the dataset's vs the target's replies ({args.config})",
                ["replies", "held-out top-1", "held-out acceptance", "tau", "per-depth acceptance", "AR tok/s",
                 "spec tok/s", "speedup"], rows)
    results["ratio"] = {key: results["target"]["eval"][key] / results["source"]["eval"][key]
                        for key in ("tau", "speedup")}
    print(f"\ntarget/source: tau {results['ratio']['tau']:.2f}x, speedup {results['ratio']['speedup']:.2f}x")
    print(f"wrote {write_results(results, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
