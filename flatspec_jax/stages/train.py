"""``flatspec train``: train the EAGLE draft head on the selected samples (resumes automatically)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from flatspec_jax.checkpoint.manager import vocab_hash
from flatspec_jax.config import Config, ConfigError
from flatspec_jax.data.feature_cache import FeatureCache
from flatspec_jax.scoring import read_fingerprint, read_inputs
from flatspec_jax.selection import SCORES_FILE, SELECTION_FILE, read_manifest
from flatspec_jax.stages.common import RunContext
from flatspec_jax.stages.score import feature_dir, score_fingerprint, score_input_changes, score_inputs
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


def run(cfg: Config, args: argparse.Namespace | None = None, ctx: RunContext | None = None) -> TrainSummary:
    ctx = ctx or RunContext(cfg)
    manifest = selection_path(cfg)
    selected = None if manifest is None else read_manifest(manifest)["ids"]
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
                          vocab_hash(ctx.tokenizer), features, ctx.draft_ids(cfg.draft.vocab, "draft.vocab"))
    log.info("trained %d steps on %d samples; held-out: %s", summary.steps, summary.train_samples,
             ", ".join(f"{k}={v:.4f}" for k, v in sorted(summary.heldout.items())))
    return summary
