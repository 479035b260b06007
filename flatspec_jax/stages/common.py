"""What several stages need: the target model, its tokenizer, the mesh and the run directory."""

from __future__ import annotations

import logging
from pathlib import Path

from jax.sharding import Mesh

from flatspec_jax import assets
from flatspec_jax.config import Config
from flatspec_jax.models.llama import Llama
from flatspec_jax.sharding import ShardingRules, make_mesh
from flatspec_jax.weights.to_nnx import load_target_model

log = logging.getLogger(__name__)


def target_path(cfg: Config) -> str:
    """The target checkpoint: ``model.path`` or the embedded SmolLM2 GGUF."""
    return cfg.model.path or str(assets.smollm2_gguf())


def build_mesh(cfg: Config) -> tuple[Mesh, ShardingRules]:
    mesh = make_mesh(cfg.mesh)
    log.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, mesh.devices.flat[0].platform)
    return mesh, ShardingRules()


def load_target(cfg: Config, mesh: Mesh, rules: ShardingRules) -> Llama:
    return load_target_model(target_path(cfg), mesh, rules, dtype=cfg.model.dtype,
                             param_dtype=cfg.model.param_dtype)


def run_dir(cfg: Config) -> Path:
    path = Path(cfg.run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
