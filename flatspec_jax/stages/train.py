"""``flatspec train``: train the EAGLE draft head on the selected samples (resumes automatically)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from flatspec_jax.checkpoint.manager import (CHECKPOINT_DIR, holds_trained_steps, read_meta, trained_draft_vocab,
                                             vocab_hash)
from flatspec_jax.config import Config, ConfigError
from flatspec_jax.data.feature_cache import FeatureCache
from flatspec_jax.runtime import process_zero_says
from flatspec_jax.scoring import read_fingerprint, read_inputs
from flatspec_jax.selection import SCORES_FILE, SELECTION_FILE, read_manifest, selection_changes
from flatspec_jax.stages.common import RunContext
from flatspec_jax.stages.score import (check_scores_current, feature_dir, score_fingerprint, score_input_changes,
                                      score_inputs)
from flatspec_jax.train.loop import TrainSummary, train_draft

log = logging.getLogger(__name__)


def selection_path(cfg: Config) -> Path | None:
    """The manifest ``data.selection`` names: a path, 'run' (this run's selection.json) or null (all data)."""
    if cfg.data.selection is None:
        return None
    if cfg.data.selection == "run":
        path = Path(cfg.run_dir) / SELECTION_FILE
        hint = "run `flatspec select` first, or set data.selection to null to train on all data"
    else:
        path = Path(cfg.data.selection)
        hint = "name another run's selection.json, 'run' for this run's own, or null for all data"
    if not path.exists():
        raise ConfigError(f"data.selection: {path} does not exist ({hint})")
    return path


def selected_ids(cfg: Config, model_path: str) -> list[str] | None:
    """The ids of the manifest ``data.selection`` names (None: all data), checked against this config.

    Raises:
      ConfigError: this run's manifest was made with other select.* settings, seed or held-out count,
        or from other scores (``flatspec select`` rewrites it), or this run's scores are not this
        config's (other data, replies, model or score.* settings); another run's manifest holds out
        another number of samples (its held-out tail would not be this run's).
    """
    path = selection_path(cfg)
    if path is None:
        return None
    manifest = read_manifest(path)
    if cfg.data.selection == "run":
        scores = Path(cfg.run_dir) / SCORES_FILE
        changes = selection_changes(manifest, scores if scores.is_file() else None, cfg.select.rule, cfg.select.keep,
                                    cfg.seed, cfg.data.heldout)
        if not changes:
            check_scores_current(cfg, model_path)  # the manifest is current for the scores: are they?
        if changes:
            raise ConfigError(f"data.selection=run: {path} was made with other settings ({'; '.join(changes)}); "
                              "run `flatspec select` (or `flatspec pipeline`) first")
    elif manifest["heldout"] != cfg.data.heldout:
        raise ConfigError(f"data.selection: {path} holds out {manifest['heldout']} samples but data.heldout="
                          f"{cfg.data.heldout}: set data.heldout to {manifest['heldout']}")
    return manifest["ids"]


def _training_draft_ids(cfg: Config, ctx: RunContext) -> np.ndarray | None:
    """The reduced vocabulary (``draft.vocab``) to train over: a resumed run's own, as saved with its
    checkpoints (a later version may count the samples differently), else counted afresh."""
    checkpoints = ctx.run_dir / CHECKPOINT_DIR
    if cfg.draft.vocab and process_zero_says(holds_trained_steps(checkpoints)):  # all read, or none (a collective)
        saved = trained_draft_vocab(read_meta(checkpoints)[1])
        if saved is not None and len(saved) == cfg.draft.vocab:  # another size: resuming is refused anyway
            return saved
    return ctx.draft_ids(cfg.draft.vocab, "draft.vocab")


def run(cfg: Config, args: argparse.Namespace | None = None, ctx: RunContext | None = None) -> TrainSummary:
    ctx = ctx or RunContext(cfg)
    selected = selected_ids(cfg, ctx.model_path)
    features = None
    if cfg.train.features == "offline":
        features = FeatureCache(feature_dir(cfg))
        if features.fingerprint != score_fingerprint(cfg, ctx.samples.fingerprint):
            # The cache and the scores are written by one pass with one fingerprint; the scores file records its inputs.
            scores = ctx.run_dir / SCORES_FILE
            saved = read_inputs(scores) if read_fingerprint(scores) == features.fingerprint else None
            changes = score_input_changes(saved, score_inputs(cfg, ctx.samples.fingerprint))
            raise ConfigError(f"train.features=offline: the feature cache in {feature_dir(cfg)} was made with other "
                              f"inputs ({changes}); re-run `flatspec cache`")
    summary = train_draft(cfg, ctx.run_dir, ctx.mesh, ctx.rules, ctx.target, ctx.samples, selected,
                          vocab_hash(ctx.tokenizer), features, _training_draft_ids(cfg, ctx))
    log.info("trained %d steps on %d samples; held-out: %s", summary.steps, summary.train_samples,
             ", ".join(f"{k}={v:.4f}" for k, v in sorted(summary.heldout.items())) or "none (data.heldout=0)")
    return summary
