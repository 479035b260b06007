"""``flatspec import --format eagle``: an EAGLE-1/2 head directory -> a params-only orbax checkpoint.

    flatspec import --config C.yaml --input HEAD_DIR [--out DIR]

Reads ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``) of a head made by
``flatspec export`` or published for a Llama-family target (SafeAILab/EAGLE layout; see
:mod:`flatspec_jax.checkpoint.eagle_format`), checks it fits the configured target, and
writes it as step 0 of a params-only checkpoint in ``--out`` (default
``<run_dir>/checkpoints``) that :func:`~flatspec_jax.checkpoint.manager.load_draft_head`
(``flatspec generate --draft``) reads. The layout is in
:mod:`flatspec_jax.checkpoint.manager`'s docstring.

Identity checks: the head's shape fields and ``qkv_bias`` must equal the target's (else
:class:`~flatspec_jax.checkpoint.manager.CheckpointMismatchError` naming the field); a
head exported by us must name exactly this target and tokenizer vocabulary. The head's
``embed_tokens.weight`` must have the target's embedding shape; if its values differ from the
target's a warning is logged (the head is then probably for another checkpoint of the same
architecture), and it is not imported (the target's embedding is used at run time). RoPE and
norm settings are the head's own, as the reference runs it (``HeadSpec.arch``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from flax import nnx

from flatspec_jax.checkpoint import eagle_format
from flatspec_jax.checkpoint.eagle_format import EMBED_KEY
from flatspec_jax.checkpoint.manager import (CHECKPOINT_DIR, CheckpointMismatchError, draft_meta, flatten_params,
                                             save_draft_params, unflatten_params, vocab_hash)
from flatspec_jax.config import Config, ConfigError
from flatspec_jax.models.eagle import create_eagle_head
from flatspec_jax.sharding import host_to_global, logical_axes_of
from flatspec_jax.stages.common import RunContext, arg
from flatspec_jax.weights.reader import open_checkpoint

log = logging.getLogger(__name__)

FORMATS = ("eagle",)


def run(cfg: Config, args: argparse.Namespace | None = None, ctx: RunContext | None = None) -> Path:
    """Imports the head; returns the written step directory.

    Raises:
      CheckpointMismatchError: when the head does not fit the target (names the field or tensor).
      WeightsError: when the head directory is missing or malformed.
      ConfigError: for a missing --input, an unsupported --format, or an --out that already
        holds checkpoints.
    """
    ctx = ctx or RunContext(cfg)
    fmt = arg(args, "format", "eagle")
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if arg(args, "input") is None:
        raise ConfigError("--input: the EAGLE head directory is required")
    source = Path(arg(args, "input")).absolute()
    given = arg(args, "out")
    out = Path(given if given is not None else Path(cfg.run_dir) / CHECKPOINT_DIR).absolute()
    existing = _existing_steps(out)
    if existing:
        named = "--out" if given is not None else "the run's checkpoint directory (the default --out)"
        raise ConfigError(f"{named}: {out} already holds checkpoints (steps {existing}); import into a new directory "
                          "(--out, or another --run-dir)")

    with open_checkpoint(ctx.model_path) as reader:
        target = reader.arch
        target_embedding = reader.get("model.embed_tokens.weight")
    target_hash = vocab_hash(ctx.tokenizer)
    config_source = str(source / eagle_format.CONFIG_NAME)
    spec = eagle_format.check_head_config(eagle_format.read_head_config(source), target, config_source, target_hash)
    tensors, tensor_source = eagle_format.read_state_dict(source)
    _check_embedding(tensors.get(eagle_format.EMBED_KEY), target_embedding, tensor_source)

    abstract = nnx.eval_shape(lambda: create_eagle_head(target, spec.num_layers, fc_bias=spec.fc_bias))
    _, state = nnx.split(abstract)
    variables = flatten_params(state)
    host = eagle_format.from_state_dict(tensors, {k: v.get_value().shape for k, v in variables.items()},
                                        tensor_source)
    mesh, rules = ctx.mesh, ctx.rules
    placed = {}
    for key, variable in variables.items():
        shape, dtype = variable.get_value().shape, variable.get_value().dtype
        sharding = rules.sharding(mesh, logical_axes_of(variable), shape)
        placed[key] = variable.replace(host_to_global(np.asarray(host[key], dtype), sharding))
    params = unflatten_params(state, placed)
    meta = draft_meta(cfg.to_dict(), spec.arch(target), target, target_hash, fc_bias=spec.fc_bias,
                      draft_vocab=spec.draft_vocab)
    meta["imported_from"] = {"format": fmt, "directory": str(source), "file": tensor_source}
    step_dir = save_draft_params(out, params, meta, step=0)
    log.info("imported %s (%d layers, fc bias %s) as a params-only checkpoint: %s", tensor_source,
             spec.num_layers, spec.fc_bias, step_dir)
    return step_dir


def _existing_steps(directory: Path) -> list[int]:
    """Orbax step directories (``<int>/``) already in ``directory``."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def _check_embedding(embedding, target_embedding, source: str) -> None:
    """The head's embedding must have the target's shape; differing values are only warned about."""
    if embedding is None:
        log.warning("%s: no %s (the reference loads strictly and needs it; the target's is used)", source, EMBED_KEY)
        return
    if tuple(embedding.shape) != tuple(target_embedding.shape):
        raise CheckpointMismatchError(
            f"{source}: {EMBED_KEY} has shape {tuple(embedding.shape)}, the target's embedding "
            f"{tuple(target_embedding.shape)}; this head was made for another model")
    if not np.array_equal(np.asarray(embedding), np.asarray(target_embedding).astype(embedding.dtype)):
        diff = float(np.max(np.abs(np.asarray(embedding, np.float32) - np.asarray(target_embedding, np.float32))))
        log.warning("%s: %s differs from the target's embedding (max |diff| %.3g); the head may have been trained "
                    "for another checkpoint of this architecture. It is not imported: the target's is used",
                    source, EMBED_KEY, diff)
