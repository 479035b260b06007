"""Collects a finished demo run's results for BENCHMARKS.md: plots, curves and the eval summary.

    python benchmarks/collect_demo.py --run-dir runs/smollm2_sharegpt_demo [--log demo.log]

Copies ``plots/*.png``, ``metrics.jsonl``, ``selection.json``'s summary and ``eval.json``'s
summary (per-question records dropped) into ``benchmarks/results/demo/`` and prints the
held-out agreement curve and the evaluation as Markdown tables. With ``--log`` (the pipeline's
stderr), also the wall time of every stage from its ``pipeline: <stage>`` log lines.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, write_results  # noqa: E402

STAGE_LINE = re.compile(r"^(\d\d:\d\d:\d\d) INFO flatspec_jax\.stages\.pipeline: pipeline: (\w+)$")
"""A stage's start: the stage name alone (``pipeline: select skipped (...)`` starts nothing)."""


def stage_times(log: Path) -> dict[str, float]:
    """Seconds from each ``pipeline: <stage>`` line to the next one (the last stage to the log's last timestamp)."""
    marks, last = [], None
    for line in log.read_text(errors="replace").splitlines():
        stamp = re.match(r"^(\d\d:\d\d:\d\d) ", line)
        if stamp:
            last = datetime.strptime(stamp.group(1), "%H:%M:%S")
        found = STAGE_LINE.match(line)
        if found:
            marks.append((found.group(2), datetime.strptime(found.group(1), "%H:%M:%S")))
    ends = [t for _, t in marks[1:]] + [last]
    return {name: (end - start).total_seconds() % 86400 for (name, start), end in zip(marks, ends)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--log", help="the pipeline's stderr, for per-stage wall times")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "demo"))
    args = parser.parse_args()
    run_dir, out = Path(args.run_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for plot in sorted((run_dir / "plots").glob("*.png")):
        shutil.copy2(plot, out / plot.name)
    shutil.copy2(run_dir / "metrics.jsonl", out / "metrics.jsonl")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    evaluation = json.loads((run_dir / "eval.json").read_text())
    selection = json.loads((run_dir / "selection.json").read_text())
    summary = {"eval": {k: v for k, v in evaluation.items() if k != "questions"},
               "selection": {k: v for k, v in selection.items() if k != "ids"},
               "stage_seconds": stage_times(Path(args.log)) if args.log else None}
    write_results(summary, out / "summary.json")

    print("| step | held-out top-1 | top-3 | acceptance (sum min(p, q)) | loss |")
    print("|---:|---:|---:|---:|---:|")
    for r in records:
        if "eval_top1" in r:
            print(f"| {r['step']} | {r['eval_top1']:.3f} | {r['eval_top3']:.3f} | {r['eval_acceptance']:.3f} | "
                  f"{r['eval_loss']:.3f} |")
    e = summary["eval"]
    print("\n| tau | per-depth acceptance | AR tokens/s | speculative tokens/s | speedup | same output |")
    print("|---:|---|---:|---:|---:|---:|")
    print(f"| {e['tau']:.2f} | {', '.join(f'{a:.2f}' for a in e['per_depth_acceptance'])} | "
          f"{e['tokens_per_s_ar']:.2f} | {e['tokens_per_s_spec']:.2f} | {e['speedup']:.2f}x | "
          f"{e['same_output_fraction']:.0%} |")
    if summary["stage_seconds"]:
        print("\n| stage | wall time |\n|---|---:|")
        for name, seconds in summary["stage_seconds"].items():
            print(f"| {name} | {seconds / 60:.1f} min |")
    print(f"\ncollected into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
