"""``flatspec score``: tokenize the data and write ``scores.parquet`` (resumable)."""

from __future__ import annotations

import argparse
import hashlib
import logging

import numpy as np
import pyarrow as pa

from flatspec_jax.config import Config
from flatspec_jax.data.prepare import prepare_samples
from flatspec_jax.data.tokenizer import load_tokenizer
from flatspec_jax.scoring import score_dataset
from flatspec_jax.stages.common import build_mesh, load_target, run_dir, target_path

log = logging.getLogger(__name__)

SCORES_FILE = "scores.parquet"


def score_fingerprint(cfg: Config, tokens_fingerprint: str) -> str:
    """Scores depend on the tokenized samples, the target and the scoring settings (not on the mesh)."""
    payload = f"{tokens_fingerprint}:{cfg.section_hash('model', 'score')}"
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def summarize(table: pa.Table) -> str:
    flatness = table["flatness"].to_numpy()
    return (f"{table.num_rows} samples, {int(table['n_tokens'].to_numpy().sum())} tokens; sample flatness "
            f"mean {np.nanmean(flatness):.4f}, median {np.nanmedian(flatness):.4f}, "
            f"range [{np.nanmin(flatness):.4f}, {np.nanmax(flatness):.4f}]")


def run(cfg: Config, args: argparse.Namespace | None = None) -> pa.Table:
    directory = run_dir(cfg)
    model_path = target_path(cfg)
    dataset = prepare_samples(cfg.data, model_path, load_tokenizer(model_path), directory)
    mesh, rules = build_mesh(cfg)
    model = load_target(cfg, mesh, rules)
    table = score_dataset(model, dataset, cfg.score, mesh, rules, directory / SCORES_FILE,
                          score_fingerprint(cfg, dataset.fingerprint))
    log.info("scores: %s", summarize(table))
    return table
