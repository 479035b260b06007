"""Draft quality per token loss on one scored and selected dataset: EAGLE's soft CE vs KL, TVD, TVD++, LK.

    python benchmarks/bench_losses.py [--config configs/smollm2_sharegpt_demo.yaml] [--work DIR]
                                      [--losses eagle kl tvd tvdpp lk lk_hybrid] [--set KEY=VALUE ...]
                                      [--temperatures 1.0 ...]

The config's data is scored and selected once (``flatspec score`` and ``select`` in
``DIR/scored``); each loss then gets ``DIR/<loss>`` with those outputs and the selection
hard-linked in and runs ``flatspec pipeline`` there with ``train.loss=<loss>`` (plus every
``--set``, e.g. ``train.token_weight=1.0``), so the arms differ in the token term alone: same
samples, steps, feature term and weights, seed and data order. All arms share the held-out tail
and the MT-bench turns, so held-out agreement, tau and speedup compare directly. A complete arm
directory is reused, so an interrupted benchmark continues. Prints and writes
(``benchmarks/results/losses.json``) per arm: training wall time, the held-out agreement curve,
tau, per-depth acceptance and the speedup over autoregressive decoding measured in the same
process; then each arm's tau and speedup relative to ``eagle`` (the reference recipe).

The pipeline evaluates at the config's ``decode.temperature`` (greedy in the demo), where only
the draft's top-1 token matters; TVD, TVD++ and LK optimise the acceptance of speculative
sampling instead. ``--temperatures`` also evaluates every arm's head with sampling at each given
temperature (``flatspec eval`` in ``DIR/<loss>-t<T>``, the arm's outputs linked in), reported as
tau and per-depth acceptance per temperature.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _arms import (OUTCOME_HEADER, RELATIVE_HEADER, arms_parser, evaluate_arm, outcome_cells,  # noqa: E402
                   print_evaluations, relative, relative_cell, run_selected_arm, score_and_select)
from _common import print_table, wait_for_quiet, write_results  # noqa: E402

LOSSES = ("eagle", "kl", "tvd", "tvdpp", "lk", "lk_hybrid")


def main() -> int:
    parser = arms_parser(__doc__, "losses.json", "bench_losses")
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--temperatures", nargs="*", type=float, default=[],
                        help="also evaluate every arm with sampling at these decode temperatures")
    args = parser.parse_args()
    gate = wait_for_quiet(args.max_load, args.max_wait)
    work = Path(args.work)
    scored = score_and_select(args.config, work, args.overrides)
    results = {"config": args.config, "overrides": args.overrides, "machine_load": gate, "arms": {}}
    for loss in args.losses:
        overrides = [f"train.loss={loss}", *args.overrides]
        arm = {"loss": loss, **run_selected_arm(args.config, scored, work / loss, overrides)}
        arm["sampled"] = {f"{t:g}": evaluate_arm(args.config, work / loss, f"t{t:g}",
                                                 [*overrides, f"decode.temperature={t}"])
                          for t in args.temperatures}
        results["arms"][loss] = arm
    arms = results["arms"]
    baseline = arms.get("eagle")
    results["relative_to_eagle"] = {name: relative(arm, baseline) for name, arm in arms.items()}
    written = write_results(results, args.out)
    title = f"draft per token loss, same data and steps ({args.config} {' '.join(args.overrides)})"
    rows = [[name, *outcome_cells(arm), relative_cell(arm, baseline)] for name, arm in arms.items()]
    print_table(title, ["loss", *OUTCOME_HEADER, f"{RELATIVE_HEADER} eagle"], rows)
    for t in args.temperatures:
        print_evaluations(f"{title}, sampled at temperature {t:g}", "loss",
                          {name: arm["sampled"][f"{t:g}"] for name, arm in arms.items()})
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
