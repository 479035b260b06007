"""Speculative decoding is lossless on the real target: greedy output equals greedy autoregressive
output, and sampled output follows the target's sampling distribution.

SmolLM2-135M-Instruct (float32), the first turns of 10 MT-bench questions decoded as one batch
of 10 rows (so rows accept different lengths per round), chain and EAGLE-2 tree drafts, with an
untrained head and with a head trained for a few steps on ShareGPT (that one also drafting from
the 4096 most frequent tokens of the samples only, and as a chain that proposes only confident
drafts). The reference is autoregressive decoding through the scanned layer stack (the layout
training and scoring use); the speculative decoders run on the decoding layout (per-layer
weights and caches, ``RunContext.decoding_target``), as ``flatspec eval`` and ``generate`` do.

Sampling (temperature 1, top-p 0.95): 1,000 rows of one prompt decode two tokens each with the
trained head; the pairs are compared by a chi-square test with the exact joint distribution of
the first two tokens, enumerated from the target. The first token comes from the prefill, the
second from the first round (an accepted draft, a residual sample after a rejection, or the bonus
token), so the test sees the round's verification over the real 49,152-token vocabulary, with
top-p, a reduced draft vocabulary (chain) and a tree. `test_spec_sampling.py` tests the same
property with the power to see a wrong residual, on a tiny target.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from flatspec_jax.config import load_config
from flatspec_jax.data.chat import render_prompt
from flatspec_jax.data.prompts import load_prompts
from flatspec_jax.decoding.runner import Decoder
from flatspec_jax.decoding.sampling import SamplingSettings, warped_probs
from flatspec_jax.models.eagle import create_eagle_head
from flatspec_jax.models.masks import causal_mask
from flatspec_jax.stages import train
from flatspec_jax.stages.common import RunContext

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 40
SAMPLING = SamplingSettings(temperature=1.0, top_p=0.95)
SAMPLED_ROWS = 1000
ROWS_PER_CALL = 200
MIN_EXPECTED = 5  # pairs expected less often than this are pooled into one cell


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


@pytest.fixture(scope="module")
def sampled_prompt(context):
    _, ctx = context
    return render_prompt(ctx.tokenizer, [{"role": "user", "content": "Name one animal and say why you like it."}])


@pytest.fixture(scope="module")
def first_two_tokens(context, sampled_prompt):
    """{(t1, t2): probability} of the first two tokens after ``sampled_prompt`` under SAMPLING,
    enumerated from the target over the nucleus of t1 and, for each t1, of t2."""
    _, ctx = context

    def next_token_probs(sequences: np.ndarray) -> np.ndarray:  # [B, P] ids -> [B, V]
        batch, length = sequences.shape
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        hidden = ctx.target(jnp.asarray(sequences), positions, causal_mask(batch, length), return_logits=False).hidden
        return np.asarray(warped_probs(ctx.target.logits(hidden[:, -1]), SAMPLING), np.float64)

    first = next_token_probs(sampled_prompt[None])[0]
    firsts = np.flatnonzero(first)
    prefixes = np.concatenate([np.repeat(sampled_prompt[None], len(firsts), axis=0), firsts[:, None]], axis=1)
    seconds = next_token_probs(prefixes.astype(np.int32))
    joint = {(int(t1), int(t2)): first[t1] * seconds[row, t2]
             for row, t1 in enumerate(firsts) for t2 in np.flatnonzero(seconds[row])}
    total = sum(joint.values())  # 1 up to float32 rounding, which chisquare's sum check would see
    return {pair: p / total for pair, p in joint.items()}


@pytest.mark.parametrize("method", ["chain", "tree"])
def test_sampled_speculative_decoding_follows_the_target_distribution(context, heads, sampled_prompt,
                                                                      first_two_tokens, method):
    cfg, ctx = context
    settings = dataclasses.replace(cfg.decode, temperature=SAMPLING.temperature, top_p=SAMPLING.top_p,
                                   max_new_tokens=2, gamma=2, depth=2, top_k=4, total_tokens=8)
    draft_ids = ctx.draft_ids(4096) if method == "chain" else None
    decoder = Decoder(ctx.decoding_target, settings, ctx.eos_ids(), ctx.pad_id(), head=heads["trained"],
                      method=method, draft_ids=draft_ids)
    observed, accepted = collections.Counter(), 0
    for call in range(SAMPLED_ROWS // ROWS_PER_CALL):
        result = decoder.run([sampled_prompt] * ROWS_PER_CALL, jax.random.key(100 + call), width=len(sampled_prompt))
        assert all(len(tokens) == 2 for tokens in result.tokens), "a row ended after its first token"
        observed.update((int(tokens[0]), int(tokens[1])) for tokens in result.tokens)
        accepted += int(result.accept_counts[:, 1:].sum())
    impossible = {pair: n for pair, n in observed.items() if pair not in first_two_tokens}
    assert not impossible, f"pairs the target cannot produce under {SAMPLING}: {impossible}"
    expected = {pair: SAMPLED_ROWS * p for pair, p in first_two_tokens.items()}
    cells = [pair for pair, e in expected.items() if e >= MIN_EXPECTED]
    observed_counts = [observed[pair] for pair in cells]
    expected_counts = [expected[pair] for pair in cells]
    pooled = SAMPLED_ROWS - sum(expected_counts)
    if pooled > 1e-9:
        observed_counts.append(SAMPLED_ROWS - sum(observed_counts))
        expected_counts.append(pooled)
    assert len(observed_counts) >= 4, f"too few cells for a test: {first_two_tokens}"
    test = scipy.stats.chisquare(observed_counts, expected_counts)
    print(f"{method}: {len(observed_counts)} cells, p = {test.pvalue:.3f}, {accepted} drafts accepted")
    assert test.pvalue > 0.01, (method, test, dict(zip(cells, zip(observed_counts, expected_counts))))
    assert accepted > 0, "no draft was accepted: the round's accept path went untested"
