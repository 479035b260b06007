"""Speculative sampling is lossless: its first tokens follow the target's exact distribution.

A tiny random target (13 tokens, peaked by a scaled LM head) and a deliberately different head
that still agrees often enough for every acceptance depth to occur. The exact joint
distribution of the first three generated tokens is enumerated from the target; 20k rows of
speculative sampling (one row per sample) are compared with it by a chi-square test. The first
token comes from the prefill; the second and third come from the first round(s): accepted
drafts, residual samples after rejections and bonus tokens all appear. With gamma = 1 a round
emits at most 2 tokens, so every row whose first round rejects takes its third token from a
second round, drafted after the draft's catch-up on a residual token. The same statistic with
a broken verifier (on rejection, resample from the target instead of the residual) must fail,
showing the test has the power to see it. A last test checks the rate of acceptance itself:
the first draft of a chain is accepted with probability alpha = sum_v min(p_v, q_v).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from flatspec_jax.decoding import verify
from flatspec_jax.decoding.autoregressive import GenerationSettings
from flatspec_jax.decoding.sampling import SamplingSettings, warped_probs
from flatspec_jax.decoding.speculative import SpeculativeSettings, speculative_generate
from flatspec_jax.models.eagle import create_eagle_head
from flatspec_jax.models.llama import create_model
from flatspec_jax.models.masks import causal_mask
from flatspec_jax.weights.arch import ArchSpec
from random_weights import random_module

ARCH = ArchSpec(architecture="llama", vocab_size=13, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0)
SAMPLES = 20_000
PROMPT = [3, 1, 4, 1, 5]
MIN_EXPECTED = 5  # cells expected less often are pooled into one

CASES = {
    "chain": {"method": "chain", "gamma": 2},
    # One draft per round: the third token comes from round 2 whenever round 1 rejects.
    "chain-gamma1": {"method": "chain", "gamma": 1},
    "tree": {"method": "tree", "top_k": 3, "depth": 1, "total_tokens": 5},
    # Drafts only while the draft's confidence stays >= 0.3: rounds propose 0, 1 or 2.
    "chain-confident": {"method": "chain", "gamma": 2, "min_confidence": 0.3},
}
TEMPERATURE_ONE = SamplingSettings(temperature=1.0)
NUCLEUS = SamplingSettings(temperature=0.8, top_p=0.7)


@pytest.fixture(scope="module")
def models():
    """The target, and a head that roughly predicts its next token from the current one: fc
    passes the token embedding (scaled by 0.7) and a little noise from the feature, and its
    layer's outputs are damped; its distribution differs from the target's, but overlaps."""
    target = random_module(lambda: create_model(ARCH), seed=11, lm_head_scale=4.0)
    head = random_module(lambda: create_eagle_head(ARCH, 1), seed=12)
    d = ARCH.hidden_size
    noise = np.random.default_rng(13).normal(0.0, 0.1, (d, d))
    head.fc[...] = np.concatenate([0.7 * np.eye(d), noise]).astype(np.float32)  # fused = [embedding, feature]
    head.fc_bias[...] = np.zeros((d,), np.float32)
    for weight in (head.first_layer.self_attn.o_proj, head.first_layer.mlp.down_proj):
        weight[...] = 0.3 * np.asarray(weight[...])
    return nnx.split(target), nnx.split(head)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"))
def exact_first_tokens(graphdef, params, prompt, sampling):
    """[V, V, V] probability of the first three tokens after ``prompt`` [P], by enumeration."""
    model = nnx.merge(graphdef, params)
    vocab = model.arch.vocab_size
    first, second = jnp.meshgrid(jnp.arange(vocab), jnp.arange(vocab), indexing="ij")
    sequences = jnp.concatenate([jnp.broadcast_to(prompt, (vocab * vocab, prompt.shape[0])),
                                 first.reshape(-1, 1), second.reshape(-1, 1)], axis=1)
    batch, length = sequences.shape
    logits = model(sequences, jnp.broadcast_to(jnp.arange(length), (batch, length)), causal_mask(batch, length)).logits
    probs = warped_probs(logits[:, -3:], sampling).reshape(vocab, vocab, 3, vocab)
    return probs[0, 0, 0][:, None, None] * probs[:, 0, 1][:, :, None] * probs[:, :, 2]


def speculative_first_tokens(models, sampling, case, draft_ids=None, max_new_tokens=3):
    (target_graphdef, target_params), (head_graphdef, head_params) = models
    settings = SpeculativeSettings(GenerationSettings(max_new_tokens=max_new_tokens, cache_length=16, eos_ids=(),
                                                      sampling=sampling), **CASES[case])
    prompts = jnp.broadcast_to(jnp.asarray(PROMPT, jnp.int32), (SAMPLES, len(PROMPT)))
    lengths = jnp.full((SAMPLES,), len(PROMPT), jnp.int32)
    result = speculative_generate(target_graphdef, target_params, head_graphdef, head_params, prompts, lengths,
                                  jax.random.key(7), settings, draft_ids)
    assert result.lengths.tolist() == [max_new_tokens] * SAMPLES
    return jax.tree.map(np.asarray, result)


def chi_square_p_value(tokens: np.ndarray, exact: np.ndarray) -> float:
    """p-value of the observed first-three-token counts under ``exact`` [V, V, V]."""
    vocab = exact.shape[0]
    observed = np.bincount(np.ravel_multi_index(tokens.T, exact.shape), minlength=vocab ** 3).astype(np.float64)
    expected = exact.reshape(-1).astype(np.float64) * len(tokens)
    impossible = expected == 0  # outside the top-p nucleus: must never be drawn
    assert observed[impossible].sum() == 0
    possible = ~impossible
    small = possible & (expected < MIN_EXPECTED)
    big = possible & ~small
    observed = np.append(observed[big], observed[small].sum())
    expected = np.append(expected[big], expected[small].sum())
    observed, expected = observed[expected > 0], expected[expected > 0]  # the pool may be empty
    expected *= observed.sum() / expected.sum()  # float32 rounding of the exact probabilities
    return float(scipy.stats.chisquare(observed, expected).pvalue)


@pytest.fixture
def broken_residual(monkeypatch):
    """Verifiers that resample from the target itself after a rejection (not lossless)."""
    monkeypatch.setattr(verify, "residual", lambda p, q: p)
    speculative_generate.clear_cache()  # retrace with the patched function
    yield
    monkeypatch.undo()
    speculative_generate.clear_cache()  # drop the broken programs


@pytest.mark.parametrize("case,sampling", [("chain", TEMPERATURE_ONE), ("chain-gamma1", TEMPERATURE_ONE),
                                           ("tree", TEMPERATURE_ONE), ("chain", NUCLEUS), ("chain-gamma1", NUCLEUS),
                                           ("tree", NUCLEUS), ("chain-confident", TEMPERATURE_ONE),
                                           ("chain-confident", NUCLEUS)],
                         ids=["chain", "chain-gamma1", "tree", "chain-top-p", "chain-gamma1-top-p", "tree-top-p",
                              "chain-confident", "chain-confident-top-p"])
def test_speculative_sampling_matches_the_target_distribution(models, case, sampling):
    (target_graphdef, target_params), _ = models
    exact = exact_first_tokens(target_graphdef, target_params, jnp.asarray(PROMPT), sampling)
    result = speculative_first_tokens(models, sampling, case)
    # Rejections and acceptances both occur, at every depth (depth 2 is rarer when drafts are cut).
    floor = SAMPLES // (100 if case == "chain-confident" else 20)
    assert np.all(result.accept_counts.sum(axis=0) > floor), result.accept_counts.sum(axis=0)
    # Many rows take a second round (their first emitted 1 token), so the third token's law
    # also covers a round drafted after catching up on a rejection.
    assert set(np.unique(result.rounds)) <= {1, 2} and (result.rounds == 2).sum() > SAMPLES // 20
    if CASES[case].get("gamma") == 1:  # exactly the rows whose round 1 rejected its one draft
        np.testing.assert_array_equal(result.rounds == 2, result.accept_counts[:, 0] > 0)
    if case == "chain-confident":  # rounds proposing 0, 1 and 2 drafts all occur
        short = result.drafts < CASES[case]["gamma"] * result.rounds
        assert short.sum() > SAMPLES // 4 and (result.drafts == 0).sum() > SAMPLES // 20
    p_value = chi_square_p_value(result.tokens, np.asarray(exact))
    assert p_value > 0.01, p_value


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampling_with_a_reduced_draft_vocabulary_matches_the_target_distribution(models, case):
    """The draft proposes from 7 of the 13 tokens only (its q is zero on the rest)."""
    (target_graphdef, target_params), _ = models
    exact = exact_first_tokens(target_graphdef, target_params, jnp.asarray(PROMPT), TEMPERATURE_ONE)
    draft_ids = jnp.asarray([0, 1, 3, 4, 6, 9, 12], jnp.int32)
    result = speculative_first_tokens(models, TEMPERATURE_ONE, case, draft_ids)
    assert result.accept_counts[:, 1:].sum() > SAMPLES // 20, result.accept_counts.sum(axis=0)
    p_value = chi_square_p_value(result.tokens, np.asarray(exact))
    assert p_value > 0.01, p_value


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_residual_is_detected(models, broken_residual, case):
    (target_graphdef, target_params), _ = models
    exact = exact_first_tokens(target_graphdef, target_params, jnp.asarray(PROMPT), TEMPERATURE_ONE)
    p_value = chi_square_p_value(speculative_first_tokens(models, TEMPERATURE_ONE, case).tokens, np.asarray(exact))
    assert p_value < 1e-3, p_value


def first_draft_acceptance(models, sampling) -> float:
    """alpha = E_{x1 ~ p} sum_v min(p(v | prompt, x1), q(v | prompt, x1)): the probability that
    the first draft of round 1 is accepted, computed without the decoding code. x1 is the
    prefill's token; p is the target's warped distribution after it; q is the head's, run
    cache-free over the prompt's pairs (f_t, x_{t+1}), t = 0..P-1, whose last one carries x1."""
    (target_graphdef, target_params), (head_graphdef, head_params) = models
    target, head = nnx.merge(target_graphdef, target_params), nnx.merge(head_graphdef, head_params)
    vocab, length = ARCH.vocab_size, len(PROMPT) + 1
    sequences = jnp.concatenate([jnp.broadcast_to(jnp.asarray(PROMPT), (vocab, len(PROMPT))),
                                 jnp.arange(vocab)[:, None]], axis=1)  # [V, P + 1]: every x1
    positions = jnp.broadcast_to(jnp.arange(length), (vocab, length))
    out = target(sequences, positions, causal_mask(vocab, length))
    first = warped_probs(out.logits[0, -2], sampling)  # [V] law of x1
    p = warped_probs(out.logits[:, -1], sampling)  # [V x1, V]
    pairs = length - 1
    predicted, _ = head(out.hidden[:, :pairs], target.embed(sequences[:, 1:]), positions[:, :pairs],
                        causal_mask(vocab, pairs))
    q = warped_probs(target.logits(predicted[:, -1]), sampling)  # [V x1, V]
    return float(np.sum(np.asarray(first, np.float64) * np.sum(np.minimum(np.asarray(p, np.float64),
                                                                          np.asarray(q, np.float64)), axis=-1)))


@pytest.mark.parametrize("sampling", [TEMPERATURE_ONE, NUCLEUS], ids=["t1", "top-p"])
def test_first_draft_is_accepted_at_rate_alpha(models, sampling):
    """With gamma = 1 and 2 new tokens each row runs one round, and its one draft is accepted
    with probability alpha = 1 - TV(p, q) (averaged over the prefill's token): a binomial
    z-test over the rows. A verifier that accepted too often (say min(1, p/q) at unwarped p)
    or too rarely would leave this rate even when the output law could still look right."""
    alpha = first_draft_acceptance(models, sampling)
    assert 0.2 < alpha < 0.9, alpha  # the head differs from the target, but not wildly
    result = speculative_first_tokens(models, sampling, "chain-gamma1", max_new_tokens=2)
    assert (result.rounds == 1).all()
    accepted = int(result.accept_counts[:, 1].sum())  # rounds accepting 1 draft: one per row at most
    z = (accepted - SAMPLES * alpha) / np.sqrt(SAMPLES * alpha * (1 - alpha))
    assert abs(z) < 4, (accepted / SAMPLES, alpha, z)
