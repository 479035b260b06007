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

from _arms import arms_parser, last_heldout_cells, run_arm_pipeline  # noqa: E402
from _common import print_table, wait_for_quiet, write_results  # noqa: E402

SIDES = ("source", "target")


def run_side(config: str, run_dir: Path, responses: str, overrides: list[str]) -> dict:
    """Runs (or completes) one pipeline (:func:`_arms.run_arm_pipeline`) and adds its replies' record."""
    run_dir.mkdir(parents=True, exist_ok=True)
    side = run_arm_pipeline(config, run_dir, [f"data.responses={responses}", *overrides])
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
    results["ratio"] = {key: results["target"]["eval"][key] / results["source"]["eval"][key]
                        for key in ("tau", "speedup")}
    written = write_results(results, args.out)
    rows = []
    for responses in SIDES:
        side = results[responses]
        e = side["eval"]
        rows.append([responses, *last_heldout_cells(side), f"{e['tau']:.2f}",
                     ", ".join(f"{a:.2f}" for a in e["per_depth_acceptance"]), f"{e['tokens_per_s_ar']:.1f}",
                     f"{e['tokens_per_s_spec']:.1f}", f"{e['speedup']:.2f}x"])
    print_table(f"draft trained on the dataset's vs the target's replies ({args.config})",
                ["replies", "held-out top-1", "held-out acceptance", "tau", "per-depth acceptance", "AR tok/s",
                 "spec tok/s", "speedup"], rows)
    print(f"\ntarget/source: tau {results['ratio']['tau']:.2f}x, speedup {results['ratio']['speedup']:.2f}x")
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
