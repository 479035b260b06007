"""Training-time test: drafts trained with ``train.unroll`` = 1 (EAGLE-1/2), 2, 3 ... on one selected dataset.

    python benchmarks/bench_unroll.py [--config configs/smollm2_sharegpt_demo.yaml] [--work DIR]
                                      [--unrolls 1 2 3] [--variant NAME:key=value,...]... [--set KEY=VALUE ...]

The config's data is scored and selected once (``DIR/scored``); each unroll then gets
``DIR/unroll<K>`` with those outputs hard-linked in and runs ``flatspec pipeline`` there with
``train.unroll=<K>`` (plus every ``--set``), so the arms differ in the training-time test alone:
same samples, steps, data order, seed and evaluation. A complete arm directory is reused, so an
interrupted or extended benchmark continues. Each arm's head is also evaluated with the
decoding settings of every ``--variant`` (``NAME:key=value,...`` of ``decode.*``, default
``gamma3:gamma=3``; ``flatspec eval`` in ``DIR/unroll<K>-<NAME>``): the training-time test trains
the second and later drafts, which longer chains and trees verify.

Prints and writes (``benchmarks/results/unroll.json``) per arm: training wall time, the
held-out agreement of its first draft (and of draft k, ``eval_depth{k}_*``, where the arm
trains it), the pipeline's tau, per-depth acceptance and speedup, the same for each variant, and
tau and speedup relative to unroll 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _arms import (OUTCOME_HEADER, RELATIVE_HEADER, arms_parser, evaluate_arm, outcome_cells,  # noqa: E402
                   print_evaluations, relative, relative_cell, run_selected_arm, score_and_select)
from _common import decode_variant, print_table, wait_for_quiet, write_results  # noqa: E402

DEFAULT_VARIANTS = ("gamma3:gamma=3",)


def later_drafts_heldout(run_dir: Path) -> dict[str, float]:
    """The last held-out evaluation's metrics of drafts 2, 3, ... (``eval_depth{k}_top1`` and ``_acceptance``)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    evaluated = [r for r in records if "eval_top1" in r]  # none with data.heldout=0
    last = evaluated[-1] if evaluated else {}
    return {k: v for k, v in last.items() if k.startswith("eval_depth") and k.endswith(("_top1", "_acceptance"))}


def main() -> int:
    parser = arms_parser(__doc__, "unroll.json", "bench_unroll")
    parser.add_argument("--unrolls", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="also evaluate every arm's head with these decode.* settings (repeatable)")
    args = parser.parse_args()
    variants = dict(decode_variant(spec) for spec in (args.variant or DEFAULT_VARIANTS))
    gate = wait_for_quiet(args.max_load, args.max_wait)
    work = Path(args.work)
    scored = score_and_select(args.config, work, args.overrides)
    results = {"config": args.config, "overrides": args.overrides, "machine_load": gate, "arms": {}}
    for unroll in args.unrolls:
        overrides = [f"train.unroll={unroll}", *args.overrides]
        arm_dir = work / f"unroll{unroll}"
        arm = {"unroll": unroll, **run_selected_arm(args.config, scored, arm_dir, overrides)}
        arm["later_drafts_heldout"] = later_drafts_heldout(arm_dir)
        arm["variants"] = {name: evaluate_arm(args.config, arm_dir, name, [*overrides, *settings])
                           for name, settings in variants.items()}
        results["arms"][str(unroll)] = arm
    arms = results["arms"]
    baseline = arms.get("1")
    results["relative_to_unroll_1"] = {name: relative(arm, baseline) for name, arm in arms.items()}
    written = write_results(results, args.out)
    title = f"draft per train.unroll, same data and steps ({args.config} {' '.join(args.overrides)})"
    rows = [[name, *outcome_cells(arm), relative_cell(arm, baseline),
             ", ".join(f"{k.removeprefix('eval_')} {v:.3f}" for k, v in sorted(arm["later_drafts_heldout"].items()))]
            for name, arm in arms.items()]
    print_table(title, ["unroll", *OUTCOME_HEADER, f"{RELATIVE_HEADER} unroll 1", "held-out, later drafts"], rows)
    for variant, settings in variants.items():
        print_evaluations(f"{title}, {variant} ({', '.join(settings)})", "unroll",
                          {name: arm["variants"][variant] for name, arm in arms.items()})
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
