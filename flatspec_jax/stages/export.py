"""``flatspec export --format eagle``: a trained draft head in the public EAGLE-1/2 layout.

    flatspec export --config C.yaml [--checkpoint DIR] [--step N] [--out DIR] [--dtype float32]

Reads the orbax checkpoint (default ``<run_dir>/checkpoints``, latest step), checks it was
trained for the configured target and tokenizer, and writes ``<run_dir>/export/eagle``
(``config.json``, ``model.safetensors``, and ``pytorch_model.bin`` when PyTorch is installed; see
:mod:`flatspec_jax.checkpoint.eagle_format`), atomically. The reference loads its heads
strictly, so ``embed_tokens.weight`` is copied from the target's checkpoint. A head trained on a
reduced vocabulary (``draft.vocab``) lists its token ids under ``flatspec.draft_vocab``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from flatspec_jax.checkpoint import eagle_format
from flatspec_jax.checkpoint.manager import (CHECKPOINT_DIR, flatten_params, load_draft_head, read_meta,
                                             trained_draft_vocab, vocab_hash)
from flatspec_jax.config import Config, ConfigError, MeshConfig
from flatspec_jax.sharding import ShardingRules, make_mesh
from flatspec_jax.stages.common import RunContext, arg
from flatspec_jax.weights.reader import open_checkpoint

log = logging.getLogger(__name__)

FORMATS = ("eagle",)
EXPORT_DIR = "export"


def run(cfg: Config, args: argparse.Namespace | None = None, ctx: RunContext | None = None) -> Path:
    """Exports the draft head; returns the output directory.

    Raises:
      CheckpointMismatchError: when the checkpoint belongs to another target or tokenizer.
      ConfigError: for an unsupported --format or --dtype.
    """
    ctx = ctx or RunContext(cfg)
    fmt = arg(args, "format", "eagle")
    dtype = arg(args, "dtype", "float32")
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if dtype not in eagle_format.EXPORT_DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {', '.join(eagle_format.EXPORT_DTYPES)}")
    checkpoint = Path(arg(args, "checkpoint", Path(cfg.run_dir) / CHECKPOINT_DIR)).absolute()
    out = Path(arg(args, "out", Path(cfg.run_dir) / EXPORT_DIR / fmt)).absolute()

    with open_checkpoint(ctx.model_path) as reader:
        target = reader.arch
        embedding = reader.get("model.embed_tokens.weight")
    target_hash = vocab_hash(ctx.tokenizer)
    step, meta = read_meta(checkpoint, arg(args, "step"))
    draft_vocab = trained_draft_vocab(meta)
    # The head is small: restore it onto one local device and convert on the host.
    mesh = make_mesh(MeshConfig(data=1), devices=jax.local_devices()[:1])
    head = load_draft_head(checkpoint, target, target_hash, mesh, ShardingRules(), step=step)
    flat = {key: np.asarray(jax.device_get(variable.get_value()))
            for key, variable in flatten_params(nnx.state(head)).items()}
    tensors = {eagle_format.EMBED_KEY: eagle_format.cast(embedding, dtype)}
    tensors.update({key: eagle_format.cast(value, dtype) for key, value in eagle_format.to_state_dict(flat).items()})
    config = eagle_format.head_config(
        head.arch, target, fc_bias=head.fc_bias is not None, target_vocab_hash=target_hash, dtype=dtype,
        pad_token_id=ctx.tokenizer.pad_token_id,
        extra={"checkpoint": str(checkpoint), "step": step, "target_path": str(ctx.model_path),
               "draft_vocab": None if draft_vocab is None else draft_vocab.tolist()})
    if draft_vocab is not None:
        log.warning("the head was trained to propose only its %d draft_vocab tokens (listed in config.json's "
                    "flatspec block); the EAGLE-1/2 reference drafts from the whole vocabulary", len(draft_vocab))
    if target.rope_scaling is not None:
        log.warning("the target uses llama3 RoPE scaling, written as rope_scaling with rope_type 'llama3': the EAGLE "
                    "reference's EConfig accepts only linear and dynamic scaling and cannot load this head "
                    "(transformers-based loaders can)")
    if target.num_heads * target.head_dim != target.hidden_size:
        log.warning("head_dim x num_attention_heads != hidden_size: the EAGLE reference derives head_dim from "
                    "hidden_size and cannot load this head")
    if jax.process_index() == 0:
        eagle_format.write_head_dir(out, config, tensors)
        log.info("exported %s/%d (%d layers, fc bias %s, %s) to %s", checkpoint, step, head.arch.num_layers,
                 head.fc_bias is not None, dtype, out)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("flatspec: export written")
    return out
