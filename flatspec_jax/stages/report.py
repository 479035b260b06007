"""``flatspec report``: plots of whatever the run directory holds -> ``<run_dir>/plots/*.png``.

    scores.parquet (+ selection.json) -> flatness_histogram.png, flatness_vs_entropy.png,
                                         position_flatness.png
    metrics.jsonl                     -> training_loss.png, learning_rate.png,
                                         agreement.png, throughput.png (those logged)
    eval.json                         -> depth_acceptance.png

A missing input only skips its plots, so the report can run after any stage.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flatspec_jax import report
from flatspec_jax.config import Config
from flatspec_jax.fingerprint import file_sha256
from flatspec_jax.selection import (
    REQUIRED_COLUMNS,
    SCORES_FILE,
    SELECTION_FILE,
    ManifestError,
    read_manifest,
    select_samples,
)
from flatspec_jax.train.metrics import METRICS_FILE, read_metrics

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"
EVAL_FILE = "eval.json"


def _current_manifest(directory: Path, scores_path: Path) -> dict[str, Any] | None:
    """selection.json when it is valid and was made from these scores; None (with a warning) otherwise."""
    path = directory / SELECTION_FILE
    if not path.is_file():
        return None
    try:
        manifest = read_manifest(path)
    except ManifestError as err:
        log.warning("ignoring the selection: %s", err)
        return None
    if manifest["scores_sha256"] != file_sha256(scores_path):
        log.warning("ignoring %s: it was made from other scores than %s (re-run `flatspec select`)",
                    path, scores_path)
        return None
    return manifest


def score_plots(cfg: Config, scores_path: Path, out: Path) -> list[Path]:
    """Flatness histogram with the selection cut, flatness vs entropy, token flatness by position."""
    try:
        table = pq.read_table(scores_path)
    except (OSError, pa.ArrowException) as err:
        log.warning("no score plots: cannot read %s (%s); re-run `flatspec score`", scores_path, err)
        return []
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        log.warning("no score plots: %s lacks column %r (has %s); re-run `flatspec score`", scores_path, missing[0],
                    ", ".join(table.column_names))
        return []
    ids = np.asarray(table["id"].to_pylist(), dtype=object)
    flatness = np.asarray(table["flatness"].to_numpy(zero_copy_only=False), dtype=np.float64)
    entropy = np.asarray(table["entropy"].to_numpy(zero_copy_only=False), dtype=np.float64)
    manifest = _current_manifest(scores_path.parent, scores_path)
    kept = heldout = None
    if manifest is not None:
        chosen = set(manifest["ids"])
        kept = np.fromiter((i in chosen for i in ids), dtype=bool, count=len(ids))
        heldout = np.arange(len(ids)) >= len(ids) - manifest["heldout"]
    if manifest is not None and manifest["rule"] in ("sfdd", "flatness_low"):
        cut, cut_label = manifest["cut"], f"{manifest['rule']} cut (keep {100 * manifest['keep']:.3g}%)"
    else:
        # What SFDD would keep at select.keep: the flatness of its last kept candidate.
        try:
            cut = select_samples(table, "sfdd", cfg.select.keep, cfg.seed, cfg.data.heldout).cut
            cut_label = f"SFDD cut at keep {100 * cfg.select.keep:.3g}%"
        except ValueError as err:
            log.warning("no SFDD cut line: %s", err)
            cut, cut_label = None, ""
    written = [
        _try(report.plot_flatness_histogram, flatness, out / "flatness_histogram.png", cut=cut,
             cut_label=cut_label, kept=kept),
        _try(report.plot_flatness_vs_entropy, flatness, entropy, out / "flatness_vs_entropy.png", kept=kept,
             heldout=heldout),
    ]
    try:
        from flatspec_jax.scoring import read_position_stats

        positions = read_position_stats(scores_path)
    except (KeyError, TypeError, ValueError) as err:
        log.warning("%s has no token-flatness-by-position statistics (%s); skipping that plot", scores_path, err)
    else:
        written.append(_try(report.plot_position_flatness, positions, out / "position_flatness.png"))
    return [p for p in written if p is not None]


def metrics_plots(metrics_path: Path, out: Path) -> list[Path]:
    """Training curves: loss terms, learning rate, top-k agreement, throughput (those logged)."""
    records = read_metrics(metrics_path)
    for key, step in sorted(report.non_finite_metrics(records).items(), key=lambda item: (item[1], item[0])):
        log.warning("%s: %s is NaN or infinite from step %g on (did the training diverge?); the plots leave those "
                    "values out", metrics_path, key, step)
    keys = set(report.metric_keys(records))
    plots: list[tuple[bool, Callable[..., Path], str]] = [
        (bool(report.loss_keys(records)), report.plot_training_loss, "training_loss.png"),
        (bool(keys & set(report.LR_KEYS)), report.plot_learning_rate, "learning_rate.png"),
        (bool(report.agreement_keys(records)), report.plot_agreement, "agreement.png"),
        ("tokens_per_s" in keys, report.plot_throughput, "throughput.png"),
    ]
    written = [_try(plot, records, out / name) for present, plot, name in plots if present]
    for present, _, name in plots:
        if not present and (out / name).is_file():  # drawn from an earlier state of these metrics
            log.info("removing %s: %s no longer holds what it plots", out / name, metrics_path.name)
            (out / name).unlink()
    return [p for p in written if p is not None]


def eval_plots(eval_path: Path, out: Path) -> list[Path]:
    """Acceptance by draft depth."""
    try:
        result = json.loads(eval_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        log.warning("cannot read %s (%s); skipping its plot", eval_path, err)
        return []
    if not isinstance(result, dict):
        log.warning("%s is not a JSON object; skipping its plot", eval_path)
        return []
    path = _try(report.plot_depth_acceptance, result, out / "depth_acceptance.png")
    return [] if path is None else [path]


def _try(plot: Callable[..., Path], *args: Any, **kwargs: Any) -> Path | None:
    """Runs one plot; data it cannot draw (ValueError) skips that plot with a warning instead of the report."""
    try:
        return plot(*args, **kwargs)
    except ValueError as err:
        log.warning("skipped %s: %s", Path(args[-1]).name if args else plot.__name__, err)
        return None


def run(cfg: Config, args: argparse.Namespace | None = None) -> list[Path]:
    """Writes every plot the run directory's files allow and returns their paths.

    Raises:
      FileNotFoundError: when the run directory does not exist.
    """
    directory = Path(cfg.run_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"run directory {directory} does not exist; run `flatspec score` first")
    import jax

    if jax.process_index() != 0:
        return []
    out = directory / PLOTS_DIR
    written: list[Path] = []
    if (directory / SCORES_FILE).is_file():
        written += score_plots(cfg, directory / SCORES_FILE, out)
    if (directory / METRICS_FILE).is_file():
        written += metrics_plots(directory / METRICS_FILE, out)
    if (directory / EVAL_FILE).is_file():
        written += eval_plots(directory / EVAL_FILE, out)
    present = [name for name in (SCORES_FILE, METRICS_FILE, EVAL_FILE) if (directory / name).is_file()]
    if written:
        log.info("report: wrote %d plot(s) to %s: %s", len(written), out, ", ".join(p.name for p in written))
    elif present:
        log.warning("report: nothing to plot in %s: %s hold(s) nothing it can draw", directory, ", ".join(present))
    else:
        log.warning("report: nothing to plot in %s (no %s, %s or %s)", directory, SCORES_FILE, METRICS_FILE,
                    EVAL_FILE)
    return written
