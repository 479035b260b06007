"""``flatspec select``: apply ``select.rule`` to ``scores.parquet`` -> ``selection.json`` (skipped when current)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import jax
import pyarrow.parquet as pq
from jax.experimental import multihost_utils

from flatspec_jax.checkpoint.manager import CHECKPOINT_DIR, holds_trained_steps, read_meta
from flatspec_jax.config import Config, ConfigError
from flatspec_jax.runtime import process_zero_says
from flatspec_jax.selection import (
    SELECTION_FILE,
    ScoresError,
    manifest_dict,
    manifest_is_current,
    read_manifest,
    select_samples,
    write_manifest,
)
from flatspec_jax.stages.common import RunContext
from flatspec_jax.stages.score import check_scores_current
from flatspec_jax.train.resume import input_changes, selection_hash

log = logging.getLogger(__name__)


def summarize(manifest: dict[str, Any]) -> str:
    """One line: kept N of M samples, share of trained tokens kept, the cut."""
    summary = manifest["summary"]
    fraction = summary.get("trained_tokens_kept_fraction")
    share = "n/a" if fraction is None else f"{100 * fraction:.1f}%"
    cut = "" if manifest["cut"] is None else f"; cut {manifest['score_column']} {manifest['cut']:.6g}"
    eligible = "" if manifest["eligible"] == manifest["candidates"] else f"{manifest['eligible']} eligible, "
    return (f"rule {manifest['rule']}: kept {manifest['count']} of {manifest['candidates']} candidate samples "
            f"({eligible}{manifest['heldout']} held out), {summary['kept']['trained_tokens']} of "
            f"{summary['candidates']['trained_tokens']} trained tokens ({share}){cut}")


def _refuse_if_trained_on_another_selection(checkpoints: Path, ids: list[str]) -> None:
    """Rewriting the manifest a run's checkpoints were trained on would leave training unable to
    resume (it refuses another selection): refused here, before the manifest is touched."""
    if not process_zero_says(holds_trained_steps(checkpoints)):
        return
    # Every process reads the checkpoints: opening them is a collective in a multi-process job.
    changed = bool(input_changes(read_meta(checkpoints)[1], {"selection": selection_hash(ids)}))
    if process_zero_says(changed):
        raise ConfigError(f"{checkpoints} holds a draft trained on another selection than these select.* settings "
                          "give; select into a new run_dir, or delete the checkpoints to train on this selection")


def run(cfg: Config, args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Writes ``<run_dir>/selection.json`` and returns the manifest (read back when already current).

    Raises:
      FileNotFoundError: when the run directory has no scores.parquet yet.
      ConfigError: when its scores were made with other data, replies, model or scoring settings, or
        when the run's checkpoints were trained on another selection than this one.
    """
    directory = Path(cfg.run_dir)
    scores_path = check_scores_current(cfg, RunContext(cfg).model_path)
    manifest_path = directory / SELECTION_FILE
    rule, keep, seed, heldout = cfg.select.rule, cfg.select.keep, cfg.seed, cfg.data.heldout
    # Process 0 decides for all (a broadcast, so before anyone writes): a process seeing another
    # version of the manifest would otherwise skip the barrier below and leave the others at it.
    current = bool(process_zero_says(manifest_is_current(manifest_path, scores_path, rule, keep, seed, heldout)))
    if current:
        manifest = read_manifest(manifest_path)
        log.info("%s is current; nothing to do", manifest_path)
    else:
        # Every process computes the same selection (cheap, CPU-only); the first one writes it.
        try:
            selection = select_samples(pq.read_table(scores_path), rule, keep, seed, heldout)
        except ConfigError:
            raise
        except ValueError as err:  # the table's content, not a setting: name the file
            raise ScoresError(f"{scores_path}: {err}") from None
        if cfg.data.selection == "run":
            _refuse_if_trained_on_another_selection(directory / CHECKPOINT_DIR, selection.ids)
        manifest = manifest_dict(selection, scores_path, manifest_path)
        if jax.process_index() == 0:
            write_manifest(manifest_path, selection, scores_path)
            log.info("wrote %s", manifest_path)
        # Later stages of the same job read the manifest from every process.
        multihost_utils.sync_global_devices("flatspec: selection written")
    log.info("selection: %s", summarize(manifest))
    return manifest
