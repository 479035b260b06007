"""Greedy speculative decoding equals greedy autoregressive decoding on the real target.

SmolLM2-135M-Instruct (float32), the first turns of 10 MT-bench questions decoded as one batch
of 10 rows (so rows accept different lengths per round), chain and EAGLE-2 tree drafts, with an
untrained head and with a head trained for a few steps on ShareGPT (that one also drafting from
the 4096 most frequent tokens of the samples only, and as a chain that proposes only confident
drafts). The reference is autoregressive decoding through the scanned layer stack (the layout
training and scoring use); the speculative decoders run on the decoding layout (per-layer
weights and caches, ``RunContext.decoding_target``), as ``flatspec eval`` and ``generate`` do.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from flatspec_jax.config import load_config
from flatspec_jax.data.chat import render_prompt
from flatspec_jax.data.prompts import load_prompts
from flatspec_jax.decoding.runner import Decoder
from flatspec_jax.models.eagle import create_eagle_head
from flatspec_jax.stages import train
from flatspec_jax.stages.common import RunContext

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 40


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("spec_real")
    cfg = load_config(None, [
        f"run_dir={run_dir}", "mesh.data=1", "data.limit=48", "data.max_length=256", "data.heldout=4",
        "train.row_length=256", "train.batch_tokens=1024", "train.steps=25", "train.learning_rate=0.001",
        "train.warmup_steps=5", "train.log_every=5", "train.eval_every=25", "train.save_every=25",
        f"decode.max_new_tokens={MAX_NEW_TOKENS}", "decode.max_cache_length=1024"])
    ctx = RunContext(cfg)
    return cfg, ctx


@pytest.fixture(scope="module")
def prompts(context):
    _, ctx = context
    return [render_prompt(ctx.tokenizer, [{"role": "user", "content": p.turns[0]}])
            for p in load_prompts("mtbench", limit=10)]


@pytest.fixture(scope="module")
def reference(context, prompts):
    cfg, ctx = context
    assert ctx.target.scan_layers
    decoder = Decoder(ctx.target, cfg.decode, ctx.eos_ids(), ctx.pad_id(), method="ar")
    return decoder.run(prompts, jax.random.key(0)).tokens


def test_greedy_autoregressive_of_split_layers_equals_the_layer_scan(context, prompts, reference):
    cfg, ctx = context
    assert not ctx.decoding_target.scan_layers
    decoder = Decoder(ctx.decoding_target, cfg.decode, ctx.eos_ids(), ctx.pad_id(), method="ar")
    for row, (ours, expected) in enumerate(zip(decoder.run(prompts, jax.random.key(0)).tokens, reference)):
        np.testing.assert_array_equal(ours, expected, err_msg=f"question {row} (split layers)")


@pytest.fixture(scope="module")
def heads(context):
    cfg, ctx = context
    trained_summary = train.run(cfg, ctx=ctx)
    assert trained_summary.heldout["eval_top1"] > 0.05, trained_summary.heldout
    return {"untrained": create_eagle_head(ctx.target.arch, seed=1), "trained": ctx.draft_head()}


@pytest.mark.parametrize("head_name", ["untrained", "trained"])
@pytest.mark.parametrize("method", ["chain", "tree"])
def test_greedy_speculative_equals_autoregressive(context, prompts, reference, heads, head_name, method):
    cfg, ctx = context
    decoder = Decoder(ctx.decoding_target, cfg.decode, ctx.eos_ids(), ctx.pad_id(), head=heads[head_name],
                      method=method)
    result = decoder.run(prompts, jax.random.key(0))
    for row, (ours, expected) in enumerate(zip(result.tokens, reference)):
        np.testing.assert_array_equal(ours, expected, err_msg=f"question {row} ({method}, {head_name} head)")
    if head_name == "trained":
        histogram = result.accept_counts.sum(axis=0)
        assert histogram[1:].sum() > 0, f"the trained head never had a draft accepted: {histogram}"


@pytest.mark.parametrize("method", ["chain", "tree"])
def test_greedy_speculative_with_a_reduced_draft_vocabulary_equals_autoregressive(context, prompts, reference, heads,
                                                                                  method):
    cfg, ctx = context
    draft_ids = ctx.draft_ids(4096)
    assert len(draft_ids) == 4096 and set(ctx.eos_ids()) <= set(draft_ids.tolist())
    decoder = Decoder(ctx.decoding_target, cfg.decode, ctx.eos_ids(), ctx.pad_id(), head=heads["trained"],
                      method=method, draft_ids=draft_ids)
    result = decoder.run(prompts, jax.random.key(0))
    for row, (ours, expected) in enumerate(zip(result.tokens, reference)):
        np.testing.assert_array_equal(ours, expected, err_msg=f"question {row} ({method}, 4096-token draft)")
    assert result.accept_counts.sum(axis=0)[1:].sum() > 0


def test_greedy_confident_chain_equals_autoregressive(context, prompts, reference, heads):
    """decode.min_confidence: the ten rows propose 0..gamma drafts per round, the round verifying
    the most any row proposed (the cache only read in the verify forward, written after it)."""
    cfg, ctx = context
    settings = dataclasses.replace(cfg.decode, method="chain", min_confidence=0.3)
    decoder = Decoder(ctx.decoding_target, settings, ctx.eos_ids(), ctx.pad_id(), head=heads["trained"])
    result = decoder.run(prompts, jax.random.key(0))
    for row, (ours, expected) in enumerate(zip(result.tokens, reference)):
        np.testing.assert_array_equal(ours, expected, err_msg=f"question {row} (chain, min_confidence 0.3)")
    assert 0 < result.drafts.sum() < settings.gamma * result.target_calls.sum()
    assert result.accept_counts.sum(axis=0)[1:].sum() > 0
