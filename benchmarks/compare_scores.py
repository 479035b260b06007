"""Agreement of two scoring runs of the same samples, e.g. float32 vs bfloat16 (`model.dtype`).

    python benchmarks/compare_scores.py REFERENCE_RUN_DIR OTHER_RUN_DIR [--out benchmarks/results/x.json]

Reads each run directory's ``scores.parquet`` and, where both have one, ``selection.json``, and
reports per score column (flatness, flatness_all, entropy, top1_prob, nll) over the samples both
scored: the largest and the median relative difference |other - ref| / |ref| and the Spearman
rank correlation; then how many of the reference selection's ids the other selection also kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results  # noqa: E402

COLUMNS = ("flatness", "flatness_all", "entropy", "top1_prob", "nll")


def _ranks(values: np.ndarray) -> np.ndarray:
    """[N] ranks 0..N-1 (float scores: ties are not expected and broken by position)."""
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    return ranks


def _scores(run_dir: Path) -> dict[str, dict[str, float]]:
    path = run_dir / "scores.parquet"
    if not path.exists():
        raise SystemExit(f"{path}: no scores (run `flatspec score` for this run directory first)")
    table = pq.read_table(path).to_pydict()
    return {column: dict(zip(table["id"], table[column])) for column in COLUMNS}


def compare(reference: Path, other: Path) -> dict:
    ref, oth = _scores(reference), _scores(other)
    common = sorted(set(ref["flatness"]) & set(oth["flatness"]))
    columns = {}
    for column in COLUMNS:
        pairs = np.array([(ref[column][i], oth[column][i]) for i in common], np.float64)
        pairs = pairs[~np.isnan(pairs).any(axis=1)]
        relative = np.abs(pairs[:, 1] - pairs[:, 0]) / np.abs(pairs[:, 0])
        columns[column] = {"samples": len(pairs), "max_rel_diff": float(relative.max()),
                           "median_rel_diff": float(np.median(relative)),
                           "spearman": float(np.corrcoef(_ranks(pairs[:, 0]), _ranks(pairs[:, 1]))[0, 1])}
    result = {"reference": str(reference), "other": str(other), "samples": {"reference": len(ref["flatness"]),
              "other": len(oth["flatness"]), "common": len(common)}, "columns": columns}
    selections = [run / "selection.json" for run in (reference, other)]
    if all(path.exists() for path in selections):
        kept = [set(json.loads(path.read_text())["ids"]) for path in selections]
        result["selection"] = {"reference_kept": len(kept[0]), "other_kept": len(kept[1]),
                               "kept_by_both": len(kept[0] & kept[1])}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", type=Path, help="run directory of the reference scores (e.g. float32)")
    parser.add_argument("other", type=Path, help="run directory of the scores to compare with it")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    result = compare(args.reference, args.other)
    print_table(f"{args.other} vs {args.reference} ({result['samples']['common']} samples in both)",
                ["score", "max rel diff", "median rel diff", "Spearman"],
                [[name, f"{c['max_rel_diff']:.2e}", f"{c['median_rel_diff']:.2e}", f"{c['spearman']:.5f}"]
                 for name, c in result["columns"].items()])
    if "selection" in result:
        s = result["selection"]
        print(f"selection: {s['kept_by_both']} of the reference's {s['reference_kept']} kept by both "
              f"(other kept {s['other_kept']})")
    if args.out:
        print(f"results written to {write_results(result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
