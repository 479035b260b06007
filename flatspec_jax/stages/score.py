"""``flatspec score`` / ``flatspec cache``: one pass of the target over the data.

``score`` writes ``scores.parquet`` and, when ``train.features`` is ``offline``, the feature
cache in the same pass; ``cache`` always writes both. Both resume where they stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from flatspec_jax.config import Config, ConfigError
from flatspec_jax.data.prepare import tokens_fingerprint
from flatspec_jax.data.regenerate import responses_are_current
from flatspec_jax.profiling import StepProfiler
from flatspec_jax.scoring import LAYOUT_SETTINGS, read_fingerprint, read_inputs, score_dataset
from flatspec_jax.selection import SCORES_FILE
from flatspec_jax.stages.common import RunContext

log = logging.getLogger(__name__)

FEATURES_DIR = "features"


def score_inputs(cfg: Config, tokens_fingerprint: str) -> dict[str, Any]:
    """What scores and cached features depend on: the tokenized samples, the target and the scoring
    settings except :data:`~flatspec_jax.scoring.LAYOUT_SETTINGS`, which only cut the pass into work
    (a finished pass stays current when they change, as it does on another mesh; its unfinished parts
    count only for the layout they were cut with). Stored in the scores file, to name what changed."""
    settings = {k: v for k, v in dataclasses.asdict(cfg.score).items() if k not in LAYOUT_SETTINGS}
    return {"tokens": tokens_fingerprint, "model": cfg.section_hash("model"), "score": settings}


def score_fingerprint(cfg: Config, tokens_fingerprint: str) -> str:
    """The sha256 (16 hex digits) of :func:`score_inputs`."""
    payload = json.dumps(score_inputs(cfg, tokens_fingerprint), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def score_input_changes(saved: dict[str, Any] | None, now: dict[str, Any]) -> str:
    """What differs between the :func:`score_inputs` a scores file was made with and ``now``, for an
    error message ("score.temperature: 1.0 -> 2.0"); a generic phrase for files that did not record them."""
    if not saved:
        return "other data, model or score.* settings"
    changes = [f"score.{key}: {saved['score'].get(key)!r} -> {value!r}"
               for key, value in sorted(now["score"].items()) if saved["score"].get(key) != value]
    if saved.get("model") != now["model"]:
        changes.insert(0, "the model.* settings")
    if saved.get("tokens") != now["tokens"]:
        changes.insert(0, "the tokenized samples (data.*, the data or the model files)")
    return "; ".join(changes) or "other settings"


def check_scores_current(cfg: Config, model_path: str) -> Path:
    """The run's ``scores.parquet``, checked to be this config's: made from its tokenized samples (with
    ``data.responses: target``, from the target's replies these settings give), model and score.* settings.

    Raises:
      FileNotFoundError: there is no scores file yet.
      ConfigError: naming what changed, or the file is unreadable.
    """
    directory = Path(cfg.run_dir)
    scores_path = directory / SCORES_FILE
    if not scores_path.is_file():
        raise FileNotFoundError(f"{scores_path} does not exist: run `flatspec score` with this config "
                                "(and run directory) first")
    if cfg.data.responses == "target" and not responses_are_current(cfg, model_path):
        raise ConfigError(f"{scores_path} scores the target's replies in {directory}, which these regenerate.*, "
                          "data.* or model settings would regenerate: run `flatspec regenerate` and "
                          "`flatspec score` (or `flatspec pipeline`) first")
    samples = tokens_fingerprint(cfg.data, model_path, directory)
    found = read_fingerprint(scores_path)
    if found is None:
        raise ConfigError(f"{scores_path} is unreadable (cut short or not a scores file): run `flatspec score` "
                          "with this config to rewrite it")
    if found != score_fingerprint(cfg, samples):
        changes = score_input_changes(read_inputs(scores_path), score_inputs(cfg, samples))
        raise ConfigError(f"{scores_path} was scored with other inputs than this config's ({changes}): run "
                          "`flatspec score` with it first")
    return scores_path


def summarize(table: pa.Table) -> str:
    flatness = table["flatness"].to_numpy()
    return (f"{table.num_rows} samples, {int(table['n_tokens'].to_numpy().sum())} tokens; sample flatness "
            f"mean {np.nanmean(flatness):.4f}, median {np.nanmedian(flatness):.4f}, "
            f"range [{np.nanmin(flatness):.4f}, {np.nanmax(flatness):.4f}]")


def feature_dir(cfg: Config) -> Path:
    return Path(cfg.run_dir) / FEATURES_DIR


def _score(cfg: Config, ctx: RunContext | None, with_features: bool) -> pa.Table:
    ctx = ctx or RunContext(cfg)
    samples = ctx.samples  # before the target: a bad data source fails without loading the weights
    table = score_dataset(ctx.target, samples, cfg.score, ctx.mesh, ctx.rules, ctx.run_dir / SCORES_FILE,
                          score_fingerprint(cfg, samples.fingerprint),
                          feature_dir(cfg) if with_features else None,
                          inputs=score_inputs(cfg, samples.fingerprint),
                          profiler=StepProfiler.for_stage(cfg.profile, ctx.run_dir, "score"))
    log.info("scores: %s", summarize(table))
    return table


def run(cfg: Config, args: argparse.Namespace | None = None, ctx: RunContext | None = None) -> pa.Table:
    return _score(cfg, ctx, with_features=cfg.train.features == "offline")


def run_cache(cfg: Config, args: argparse.Namespace | None = None, ctx: RunContext | None = None) -> pa.Table:
    return _score(cfg, ctx, with_features=True)
