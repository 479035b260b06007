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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _arms import (OUTCOME_HEADER, flatspec, link_outputs, outcome_cells, relative_cell,  # noqa: E402
                   run_arm_pipeline)
from _common import REPO, benchmark_parser, print_table, wait_for_quiet, write_results  # noqa: E402

ARMS = ("sfdd", "random", "flatness_low", "all")


def trained_tokens(run_dir: Path) -> int:
    """Trained (assistant) tokens of the samples ``run_dir/selection.json`` keeps."""
    return int(json.loads((run_dir / "selection.json").read_text())["summary"]["kept"]["trained_tokens"])


def run_arm(config: str, scored: Path, run_dir: Path, arm: str, keep: float, base_steps: int,
            reference_tokens: int) -> dict:
    """Selects, then runs (or completes) one arm's pipeline with steps scaled to its kept tokens."""
    run_dir.mkdir(parents=True, exist_ok=True)
    link_outputs(scored, run_dir)
    selection = [f"select.rule={arm}", f"select.keep={1.0 if arm == 'all' else keep}"]
    flatspec("select", config, run_dir, selection, "select")
    tokens = trained_tokens(run_dir)
    steps = max(1, round(base_steps * tokens / reference_tokens))
    outcome = run_arm_pipeline(config, run_dir, selection + [f"train.steps={steps}"])
    manifest = json.loads((run_dir / "selection.json").read_text())
    return {"rule": arm, "keep": manifest["keep"], "samples": manifest["count"], "trained_tokens": tokens,
            "steps": steps, **outcome}


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
        rows.append([name, arm["samples"], arm["trained_tokens"], arm["steps"], *outcome_cells(arm),
                     relative_cell(arm, baseline)])
    print_table(f"draft per selection rule, same epochs ({args.config})",
                ["arm", "samples", "trained tokens", "steps", *OUTCOME_HEADER, "tau / speedup vs all"], rows)
    print(f"wrote {write_results(results, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
