"""``flatspec generate``: one chat reply from the target, printed alone on stdout."""

from __future__ import annotations

import argparse
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flatspec_jax.config import Config
from flatspec_jax.data.chat import render_prompt
from flatspec_jax.decoding.autoregressive import GenerationSettings, generate
from flatspec_jax.decoding.sampling import SamplingSettings
from flatspec_jax.stages.common import RunContext, round_up

log = logging.getLogger(__name__)

PROMPT_BUCKET = 64
"""Prompts are padded to a multiple of this, so similar prompts share one compiled program."""


def run(cfg: Config, args: argparse.Namespace, ctx: RunContext | None = None) -> None:
    ctx = ctx or RunContext(cfg)
    tokenizer, model = ctx.tokenizer, ctx.target
    prompt = render_prompt(tokenizer, [{"role": "user", "content": args.prompt}])
    padded = round_up(len(prompt), PROMPT_BUCKET)
    cache_length = min(cfg.decode.max_cache_length, round_up(padded + cfg.decode.max_new_tokens, 128))
    if len(prompt) >= cache_length:
        raise SystemExit(f"flatspec generate: the prompt has {len(prompt)} tokens, more than "
                         f"decode.max_cache_length={cfg.decode.max_cache_length} allows")
    settings = GenerationSettings(
        max_new_tokens=cfg.decode.max_new_tokens, cache_length=cache_length,
        eos_ids=model.arch.eos_token_ids or (tokenizer.eos_token_id,),
        sampling=SamplingSettings(cfg.decode.temperature, cfg.decode.top_p),
        pad_id=tokenizer.pad_token_id or 0)
    prompts = np.zeros((1, padded), np.int32)
    prompts[0, :len(prompt)] = prompt
    graphdef, params = nnx.split(model)
    start = time.perf_counter()
    result = generate(graphdef, params, jnp.asarray(prompts), jnp.asarray([len(prompt)], jnp.int32),
                      jax.random.key(cfg.seed), settings)
    tokens = np.asarray(result.tokens[0, :int(result.lengths[0])])
    elapsed = time.perf_counter() - start
    log.info("generated %d tokens in %.2f s (compilation included)", len(tokens), elapsed)
    tokens = tokens[~np.isin(tokens, settings.eos_ids)]
    print(tokenizer.decode(tokens, skip_special_tokens=True).strip())
