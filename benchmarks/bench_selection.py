"""Draft quality and training cost per data-selection rule on one scored dataset: SFDD vs random vs all.

    python benchmarks/bench_selection.py [--config configs/smollm2_sharegpt_demo.yaml] [--work DIR]
                                         [--arms sfdd random all] [--keep 0.5] [--seeds 0 1 2]
                                         [--set KEY=VALUE ...] [--extra-prompts FILE.jsonl]

The experiment of arXiv 2601.18902 at the config's scale. The config's data is scored once
(``flatspec score`` in ``DIR/scored``, with the offline feature cache when ``train.features`` is
``offline``); each arm and seed then gets ``DIR/<arm>`` (seed 0) or ``DIR/<arm>_seed<s>`` with
those outputs hard-linked in (so no arm scores again) and runs ``flatspec pipeline`` there with
its own selection and ``seed=<s>``:

* ``sfdd``: the flattest ``--keep`` of the samples (the paper's SFDD);
* ``random``: a random ``--keep``, drawn with the run's seed;
* ``flatness_low``: the least flat ``--keep`` (the paper's inverse ablation);
* ``all``: every sample.

The seed also sets the head's initialisation and the feature noise (not the data order, which
``data.shuffle_seed`` sets and ``--set`` may change for every arm), so
several ``--seeds`` separate the rules from run-to-run variation: the summary gives each rule's
mean and standard deviation over its seeds. Every arm trains for the same number of epochs over
its own data: ``train.steps`` scales with the trained tokens the arm keeps, relative to the
config's own selection at the config's ``train.steps``. All arms share the held-out tail (the last
``data.heldout`` samples of the scores, never selected) and the MT-bench turns, so held-out
agreement, tau and speedup compare directly. ``--set`` overrides apply to every stage of every
arm (e.g. ``data.heldout=48`` for a larger held-out set, ``eval.limit=10`` for a shorter
evaluation). ``--extra-prompts`` evaluates every run's head once more on a JSONL of prompts
(``flatspec eval`` in ``DIR/<run>-extra``, e.g. further MT-bench questions), reported as
``extra_eval``. A complete arm directory is reused (the pipeline skips current stages), so an
interrupted benchmark continues, and more seeds can be added later. Prints and writes
(``benchmarks/results/selection.json``) per run: samples and trained tokens kept, steps,
training wall time, the held-out agreement curve, tau, per-depth acceptance and the speedup over
autoregressive decoding measured in the same process; then each rule's tau, speedup and
training time relative to ``all``, and with several seeds the per-rule means.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _arms import (OUTCOME_HEADER, RELATIVE_HEADER, arms_parser, evaluate_arm, flatspec, link_outputs,  # noqa: E402
                   outcome_cells, relative, relative_cell, run_arm_pipeline, score_and_select)
from _common import print_table, wait_for_quiet, write_results  # noqa: E402

ARMS = ("sfdd", "random", "flatness_low", "all")


def trained_tokens(run_dir: Path) -> int:
    """Trained (assistant) tokens of the samples ``run_dir/selection.json`` keeps."""
    return int(json.loads((run_dir / "selection.json").read_text())["summary"]["kept"]["trained_tokens"])


def run_arm(config: str, scored: Path, run_dir: Path, arm: str, keep: float, seed: int, overrides: list[str],
            base_steps: int, reference_tokens: int, extra_prompts: str | None) -> dict:
    """Selects, then runs (or completes) one arm's pipeline with steps scaled to its kept tokens, and
    evaluates its head on ``extra_prompts`` too when given."""
    run_dir.mkdir(parents=True, exist_ok=True)
    link_outputs(scored, run_dir)
    settings = [*overrides, f"seed={seed}", f"select.rule={arm}", f"select.keep={1.0 if arm == 'all' else keep}"]
    flatspec("select", config, run_dir, settings, "select")
    tokens = trained_tokens(run_dir)
    steps = max(1, round(base_steps * tokens / reference_tokens))
    outcome = run_arm_pipeline(config, run_dir, settings + [f"train.steps={steps}"])
    if extra_prompts:
        outcome["extra_eval"] = evaluate_arm(config, run_dir, "extra", settings + [
            f"train.steps={steps}", f"eval.prompts={Path(extra_prompts).resolve()}", "eval.limit=null"])
    manifest = json.loads((run_dir / "selection.json").read_text())
    return {"rule": arm, "seed": seed, "keep": manifest["keep"], "samples": manifest["count"],
            "trained_tokens": tokens, "steps": steps, **outcome}


def run_name(arm: str, seed: int) -> str:
    """The run directory (and results key) of ``arm`` at ``seed``: the bare rule for seed 0."""
    return arm if seed == 0 else f"{arm}_seed{seed}"


def rule_summary(runs: list[dict]) -> dict:
    """Mean and standard deviation (ddof 1; 0 for one run) over one rule's seeds of the last held-out
    top-1 and acceptance, tau (and ``tau_extra`` on the extra prompts) and the training minutes."""
    values = {"heldout_top1": [r["heldout"][-1]["eval_top1"] if r["heldout"] else float("nan") for r in runs],
              "heldout_acceptance": [r["heldout"][-1]["eval_acceptance"] if r["heldout"] else float("nan")
                                     for r in runs],
              "tau": [r["eval"]["tau"] for r in runs],
              "train_minutes": [r["stage_seconds"].get("train", float("nan")) / 60 for r in runs]}
    if all("extra_eval" in r for r in runs):
        values["tau_extra"] = [r["extra_eval"]["tau"] for r in runs]
    return {"seeds": [r["seed"] for r in runs],
            **{name: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
               for name, v in values.items()}}


def main() -> int:
    parser = arms_parser(__doc__, "selection.json", "bench_selection")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=["sfdd", "random", "all"])
    parser.add_argument("--keep", type=float, default=0.5, help="fraction kept by sfdd, random and flatness_low")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="run seeds (each arm runs once per seed)")
    parser.add_argument("--steps", type=int, help="steps for the config's own selection (default: train.steps)")
    parser.add_argument("--extra-prompts", help="a JSONL of prompts every run's head is also evaluated on")
    args = parser.parse_args()
    gate = wait_for_quiet(args.max_load, args.max_wait)
    work = Path(args.work)
    scored = score_and_select(args.config, work, args.overrides)
    from flatspec_jax.config import load_config

    base_steps = args.steps or load_config(args.config, args.overrides).train.steps
    reference_tokens = trained_tokens(scored)
    results = {"config": args.config, "overrides": args.overrides, "machine_load": gate, "keep": args.keep,
               "seeds": args.seeds, "base_steps": base_steps, "reference_trained_tokens": reference_tokens,
               "arms": {}}
    for seed in args.seeds:  # seed-major: an interrupted run has every rule at the seeds it finished
        for arm in args.arms:
            results["arms"][run_name(arm, seed)] = run_arm(
                args.config, scored, work / run_name(arm, seed), arm, args.keep, seed, args.overrides, base_steps,
                reference_tokens, args.extra_prompts)
    arms = results["arms"]
    baselines = {name: arms.get(run_name("all", arm["seed"])) or arms.get("all") for name, arm in arms.items()}
    results["relative_to_all"] = {name: relative(arm, baselines[name]) for name, arm in arms.items()}
    if len(args.seeds) > 1:
        results["rules"] = {arm: rule_summary([r for r in arms.values() if r["rule"] == arm]) for arm in args.arms}
    written = write_results(results, args.out)
    rows = [[name, arm["samples"], arm["trained_tokens"], arm["steps"], *outcome_cells(arm),
             relative_cell(arm, baselines[name])] for name, arm in arms.items()]
    print_table(f"draft per selection rule, same epochs ({args.config})",
                ["run", "samples", "trained tokens", "steps", *OUTCOME_HEADER, f"{RELATIVE_HEADER} all"], rows)
    if len(args.seeds) > 1:
        columns = {"heldout_top1": "held-out top-1", "heldout_acceptance": "held-out acceptance", "tau": "tau",
                   "tau_extra": "tau (extra prompts)", "train_minutes": "train min"}
        shown = [k for k in columns if all(k in summary for summary in results["rules"].values())]
        print_table(f"per rule over seeds {args.seeds} (mean +- std)", ["rule", *(columns[k] for k in shown)],
                    [[arm, *(f"{summary[k]['mean']:.3f} +- {summary[k]['std']:.3f}" for k in shown)]
                     for arm, summary in results["rules"].items()])
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
