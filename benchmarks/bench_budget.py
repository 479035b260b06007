"""Training budget: drafts trained for more steps and at other peak learning rates on one selected dataset.

    python benchmarks/bench_budget.py [--config configs/smollm2_sharegpt_demo.yaml] [--work DIR]
                                      [--steps 320 960] [--learning-rates 0.001 0.003] [--set KEY=VALUE ...]

Asks whether the demo's draft is short of data or of training: the config's data is scored and
selected once (``DIR/scored``); each (steps, learning rate) pair of the grid gets
``DIR/steps<S>-lr<LR>`` with those outputs hard-linked in and runs ``flatspec pipeline`` there with
``train.steps``, ``train.learning_rate``, and ``train.eval_every`` = ``train.save_every`` = a quarter
of the steps (plus every ``--set``), so the arms differ in the budget alone: same samples, seed,
warm-up, schedule shape and evaluation. A complete arm directory is reused, so an interrupted or
extended benchmark continues.

Prints and writes (``benchmarks/results/budget.json``) per arm: training wall time, the held-out
agreement at every evaluation, the pipeline's tau, per-depth acceptance and speedup, and tau and
speedup relative to the first arm (by default 320 steps at 1e-3, the demo's budget before it moved to 960).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _arms import (OUTCOME_HEADER, RELATIVE_HEADER, arms_parser, outcome_cells, relative, relative_cell,  # noqa: E402
                   run_selected_arm, score_and_select)
from _common import print_table, wait_for_quiet, write_results  # noqa: E402


def arm_name(steps: int, learning_rate: float) -> str:
    """``steps960-lr0.003``: the arm's run directory name."""
    return f"steps{steps}-lr{learning_rate:g}"


def budget_overrides(steps: int, learning_rate: float) -> list[str]:
    """The ``--set`` overrides of one arm: its steps and peak learning rate, four held-out evaluations
    (and checkpoints) spread over its steps."""
    every = max(1, steps // 4)
    return [f"train.steps={steps}", f"train.learning_rate={learning_rate:g}", f"train.eval_every={every}",
            f"train.save_every={every}"]


def main() -> int:
    parser = arms_parser(__doc__, "budget.json", "bench_budget")
    parser.add_argument("--steps", nargs="+", type=int, default=[320, 960])
    parser.add_argument("--learning-rates", nargs="+", type=float, default=[0.001, 0.003])
    args = parser.parse_args()
    if min(args.steps) < 1 or min(args.learning_rates) <= 0:
        parser.error("--steps must be >= 1 and --learning-rates > 0")
    gate = wait_for_quiet(args.max_load, args.max_wait)
    work = Path(args.work)
    scored = score_and_select(args.config, work, args.overrides)
    results = {"config": args.config, "overrides": args.overrides, "machine_load": gate, "arms": {}}
    for steps in args.steps:
        for learning_rate in args.learning_rates:
            name = arm_name(steps, learning_rate)
            overrides = [*budget_overrides(steps, learning_rate), *args.overrides]
            arm = run_selected_arm(args.config, scored, work / name, overrides)
            results["arms"][name] = {"steps": steps, "learning_rate": learning_rate, **arm}
            write_results(results, args.out)
    arms = results["arms"]
    baseline_name = next(iter(arms))
    results["relative_to"] = {"arm": baseline_name,
                              **{name: relative(arm, arms[baseline_name]) for name, arm in arms.items()}}
    written = write_results(results, args.out)
    rows = [[name, *outcome_cells(arm), relative_cell(arm, arms[baseline_name]),
             ", ".join(f"{r['step']}: {r['eval_top1']:.3f}" for r in arm["heldout"])] for name, arm in arms.items()]
    title = f"draft per training budget, same data ({args.config} {' '.join(args.overrides)})"
    print_table(title, ["arm", *OUTCOME_HEADER, f"{RELATIVE_HEADER} {baseline_name}", "held-out top-1 by step"],
                rows)
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
