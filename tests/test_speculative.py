"""Greedy speculative decoding equals greedy autoregressive decoding, token for token, per row.

One tiny random target (O(1) embeddings, so its outputs depend on the context) and two heads:
  * "random": an untrained head, which agrees with the target now and then;
  * "agreeing": a head built to predict the target's next token from the current one: fc
    passes the token embedding through (scaled by 4, for peaked draft distributions) and its
    decoder layer adds nothing, so its logits are the target's LM head applied to the
    embedding. The embedding dominates this target's residual stream, so this head accepts
    most drafts, not all.
Parameters always enter ``jax.jit`` as arguments (``nnx.split``).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flatspec_jax.decoding.autoregressive import GenerationSettings, generate
from flatspec_jax.decoding.speculative import (SpeculativeGeneration, SpeculativeSettings, acceptance_by_depth,
                                               speculative_generate)
from flatspec_jax.models.eagle import create_eagle_head
from flatspec_jax.models.llama import create_model
from flatspec_jax.weights.arch import ArchSpec
from random_weights import agreeing_head, random_module

ARCH = ArchSpec(architecture="llama", vocab_size=13, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0)
BATCH, WIDTH, CACHE, MAX_NEW, EOS = 16, 60, 64, 24, 10
GENERATION = GenerationSettings(max_new_tokens=MAX_NEW, cache_length=CACHE, eos_ids=(EOS,))
METHODS = {
    "chain": SpeculativeSettings(GENERATION, method="chain", gamma=3),
    "tree": SpeculativeSettings(GENERATION, method="tree", depth=2, top_k=3, total_tokens=8),
}


@pytest.fixture(scope="module")
def pairs():
    target = nnx.split(random_module(lambda: create_model(ARCH), seed=3))
    head = random_module(lambda: create_eagle_head(ARCH, 1), seed=4)
    return {"random": (target, nnx.split(head)), "agreeing": (target, nnx.split(agreeing_head(ARCH, seed=5)))}


def prompts_of_lengths(lengths, seed):
    rng = np.random.default_rng(seed)
    prompts = np.zeros((len(lengths), WIDTH), np.int32)
    for row, length in enumerate(lengths):
        prompts[row, :length] = rng.integers(0, ARCH.vocab_size, length)
    return jnp.asarray(prompts), jnp.asarray(lengths, jnp.int32)


def run_both(pair, settings, prompts, lengths, draft_ids=None):
    (target_graphdef, target_params), (head_graphdef, head_params) = pair
    key = jax.random.key(0)
    reference = generate(target_graphdef, target_params, prompts, lengths, key, settings.generation)
    result = speculative_generate(target_graphdef, target_params, head_graphdef, head_params, prompts, lengths, key,
                                  settings, draft_ids)
    return reference, result


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("pair_name", ["random", "agreeing"])
def test_greedy_matches_autoregressive(pairs, method, pair_name):
    settings = METHODS[method]
    lengths = np.random.default_rng(1).integers(1, 13, BATCH)
    prompts, lengths = prompts_of_lengths(lengths, seed=2)
    reference, result = run_both(pairs[pair_name], settings, prompts, lengths)
    np.testing.assert_array_equal(result.tokens, reference.tokens)
    np.testing.assert_array_equal(result.lengths, reference.lengths)
    ends_on_eos = (result.lengths < MAX_NEW) & (result.tokens[jnp.arange(BATCH), result.lengths - 1] == EOS)
    assert bool(jnp.any(result.lengths == MAX_NEW))
    assert bool(jnp.all(result.accept_counts.sum(axis=1) == result.rounds))
    # Each round emits accepted + 1 tokens; only the last can be cut (EOS, max_new_tokens).
    emitted = (result.accept_counts * jnp.arange(settings.max_accept + 1)).sum(axis=1) + result.rounds
    assert bool(jnp.all(result.lengths - 1 <= emitted))
    assert bool(jnp.all(result.lengths - 1 > emitted - (settings.max_accept + 1)))
    assert bool(jnp.any(ends_on_eos))  # EOS before max_new_tokens too
    np.testing.assert_array_equal(result.drafts, result.rounds * (settings.verify_tokens - 1))
    # A round that accepts the deepest draft has nothing proposed after it; a full chain proposes
    # every shallower depth, a tree may end a path at a shallower leaf.
    exhausted, counts = np.asarray(result.exhausted_counts), np.asarray(result.accept_counts)
    deepest = settings.max_accept
    np.testing.assert_array_equal(exhausted[:, deepest], counts[:, deepest])
    assert np.all(exhausted <= counts)
    if method == "chain":
        np.testing.assert_array_equal(exhausted[:, :deepest], 0)
    if pair_name == "agreeing":
        assert float(jnp.mean(result.tau())) > 1.8
    else:
        assert int(jnp.sum(result.accept_counts[:, 1:])) > 0  # some drafts accepted


CONFIDENT = SpeculativeSettings(GENERATION, method="chain", gamma=3, min_confidence=0.5)
"""A chain that drafts only while the draft's probability of the chain stays >= 0.5."""


def accepted_drafts(result: SpeculativeGeneration) -> int:
    return int(jnp.sum(result.accept_counts * jnp.arange(result.accept_counts.shape[1])))


def test_a_confident_chain_matches_autoregressive_and_withholds_unsure_drafts(pairs):
    """Greedy output is unchanged. The random head (flat over 13 tokens) never reaches 0.5, so it
    proposes nothing and every round is an autoregressive step; the agreeing head proposes fewer
    than gamma drafts per round, and those it proposes are mostly accepted (0.92 of them, against
    half of all gamma drafts without the cut)."""
    prompts, lengths = prompts_of_lengths(np.random.default_rng(1).integers(1, 13, BATCH), seed=2)
    results = {}
    for pair_name in ("random", "agreeing"):
        reference, result = results[pair_name] = run_both(pairs[pair_name], CONFIDENT, prompts, lengths)
        np.testing.assert_array_equal(result.tokens, reference.tokens)
        np.testing.assert_array_equal(result.lengths, reference.lengths)
        assert int(jnp.sum(result.drafts)) < int(jnp.sum(result.rounds)) * CONFIDENT.gamma
        assert accepted_drafts(result) <= int(jnp.sum(result.drafts))
    np.testing.assert_array_equal(results["random"][1].drafts, 0)
    agreeing = results["agreeing"][1]
    assert accepted_drafts(agreeing) > 0.8 * int(jnp.sum(agreeing.drafts))
    _, uncut = run_both(pairs["agreeing"], METHODS["chain"], prompts, lengths)
    assert accepted_drafts(uncut) < 0.6 * int(jnp.sum(uncut.drafts))


def test_confident_rows_propose_different_counts_in_one_round(pairs):
    """Room for exactly one round: at min_confidence 0.3 rows propose 1, 2 and 3 drafts in the
    same round, which verifies the longest; no row accepts more than it proposed, and the tokens
    are the target's own."""
    settings = dataclasses.replace(CONFIDENT, min_confidence=0.3)
    prompts, lengths = prompts_of_lengths([CACHE - settings.verify_tokens] * BATCH, seed=3)
    reference, result = run_both(pairs["agreeing"], settings, prompts, lengths)
    ran = np.asarray(result.rounds) == 1
    assert ran.sum() >= BATCH // 2
    proposed = np.asarray(result.drafts)[ran]
    assert set(proposed.tolist()) == {1, 2, 3}, proposed
    accepted = np.argmax(np.asarray(result.accept_counts), axis=1)[ran]
    assert np.all(accepted <= proposed) and np.any(accepted == proposed) and np.any(proposed > 0)
    # The round ended for want of a proposal exactly where it accepted all it proposed.
    exhausted = np.asarray(result.exhausted_counts)[ran]
    np.testing.assert_array_equal(exhausted.sum(axis=1), accepted == proposed)
    np.testing.assert_array_equal(np.argmax(exhausted, axis=1)[accepted == proposed], accepted[accepted == proposed])
    for row in range(BATCH):
        common = min(int(result.lengths[row]), int(reference.lengths[row]))
        np.testing.assert_array_equal(result.tokens[row, :common], reference.tokens[row, :common])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_greedy_with_a_reduced_draft_vocabulary_matches_autoregressive(pairs, method):
    """The draft proposes only 7 of the 13 tokens (EOS among them); the output is unchanged and
    fewer drafts are accepted than with the whole vocabulary."""
    settings = METHODS[method]
    prompts, lengths = prompts_of_lengths(np.random.default_rng(1).integers(1, 13, BATCH), seed=2)
    draft_ids = jnp.asarray([0, 2, 3, 5, 7, 8, EOS], jnp.int32)
    reference, reduced = run_both(pairs["agreeing"], settings, prompts, lengths, draft_ids)
    np.testing.assert_array_equal(reduced.tokens, reference.tokens)
    np.testing.assert_array_equal(reduced.lengths, reference.lengths)
    _, whole = run_both(pairs["agreeing"], settings, prompts, lengths)
    assert 1.0 < float(jnp.mean(reduced.tau())) < float(jnp.mean(whole.tau()))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_rows_accept_different_lengths_in_one_round(pairs, method):
    """Prompts that leave room for exactly one round (committed + T > cache after it) stop
    after one round, so each row's histogram is its first round's accepted count."""
    settings = METHODS[method]
    length = CACHE - settings.verify_tokens
    prompts, lengths = prompts_of_lengths([length] * BATCH, seed=3)
    reference, result = run_both(pairs["agreeing"], settings, prompts, lengths)
    first_is_eos = result.tokens[:, 0] == EOS  # such rows stop before any round
    np.testing.assert_array_equal(result.rounds, jnp.where(first_is_eos, 0, 1))
    accepted = jnp.argmax(result.accept_counts, axis=1)[~first_is_eos]
    assert len(set(accepted.tolist())) >= 2, accepted  # different rows, different acceptance, same round
    # Root + accepted + bonus, unless cut by EOS; the same tokens autoregressive decoding produces
    # (which, needing one free slot per token, stops after CACHE - length tokens).
    no_eos = ~jnp.any(result.tokens == EOS, axis=1)[~first_is_eos]
    lengths = result.lengths[~first_is_eos]
    assert bool(jnp.all(jnp.where(no_eos, lengths == accepted + 2, lengths <= accepted + 2)))
    for row in range(BATCH):
        common = min(int(result.lengths[row]), int(reference.lengths[row]))
        np.testing.assert_array_equal(result.tokens[row, :common], reference.tokens[row, :common])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_rows_keep_going_while_the_cache_holds_another_round(pairs, method):
    """Prompts one slot short of leaving room for two rounds: a row whose first round accepts nothing has
    committed + T == cache slots, so it still fits one more round and must run it. Every row that ends
    without EOS ends because the next round would not fit (committed + T > cache slots)."""
    settings = METHODS[method]
    tokens_per_round = settings.verify_tokens
    prompt = CACHE - tokens_per_round - 1
    prompts, lengths = prompts_of_lengths([prompt] * BATCH, seed=4)
    reference, result = run_both(pairs["random"], settings, prompts, lengths)
    no_eos = ~np.any(np.asarray(result.tokens) == EOS, axis=1)
    committed = prompt + np.asarray(result.lengths) - 1  # the last emitted token is the uncommitted root
    assert np.all((committed + tokens_per_round > CACHE)[no_eos]), committed[no_eos]
    assert np.any((np.asarray(result.rounds) == 2) & no_eos)  # the boundary case occurred
    for row in range(BATCH):
        common = min(int(result.lengths[row]), int(reference.lengths[row]))
        np.testing.assert_array_equal(result.tokens[row, :common], reference.tokens[row, :common])


def test_first_round_drafts_continue_from_the_first_generated_token(pairs):
    """The prefill ends with the draft pair (f_{P-1}, first token). The agreeing head's prediction is
    4 embed(token) whatever the feature, so its greedy chain in round one is d_1 = g(first),
    d_{j+1} = g(d_j) with g(x) = argmax logits(4 embed(x)), and the round accepts exactly the
    drafts that lead the target's own continuation."""
    settings = METHODS["chain"]
    prompts, lengths = prompts_of_lengths([CACHE - settings.verify_tokens] * BATCH, seed=5)  # room for one round
    reference, result = run_both(pairs["agreeing"], settings, prompts, lengths)
    target = nnx.merge(*pairs["agreeing"][0])
    g = np.asarray(jnp.argmax(target.logits(4 * target.embed(jnp.arange(ARCH.vocab_size)[None]))[0], axis=-1))
    want = []
    for row in range(BATCH):
        drafts = [int(g[int(reference.tokens[row, 0])])]
        while len(drafts) < settings.gamma:
            drafts.append(int(g[drafts[-1]]))
        matches = np.asarray(drafts) == np.asarray(reference.tokens[row, 1:settings.gamma + 1])
        want.append(int(np.cumprod(matches).sum()))
    clean = ~np.any(np.asarray(reference.tokens[:, :settings.gamma + 1]) == EOS, axis=1)  # the target never stopped
    assert clean.sum() >= BATCH // 2 and len(set(np.asarray(want)[clean].tolist())) >= 2
    np.testing.assert_array_equal(np.asarray(result.rounds)[clean], 1)
    np.testing.assert_array_equal(np.argmax(np.asarray(result.accept_counts), axis=1)[clean], np.asarray(want)[clean])


def test_tau_and_acceptance_rates():
    # Row 0: 3 rounds accepting 0, 2, 3 drafts (+ bonus each) after the prefill's token: 1 + 1 + 3 + 4 = 9.
    # Row 1: stopped before any round (first token EOS).
    # Every round proposed gamma = 3 drafts, so only the round accepting all 3 is exhausted.
    result = SpeculativeGeneration(tokens=jnp.zeros((2, 9), jnp.int32), lengths=jnp.asarray([9, 1]),
                                   rounds=jnp.asarray([3, 0]), accept_counts=jnp.asarray([[1, 0, 1, 1], [0, 0, 0, 0]]),
                                   exhausted_counts=jnp.asarray([[0, 0, 0, 1], [0, 0, 0, 0]]),
                                   drafts=jnp.asarray([9, 0]))
    np.testing.assert_allclose(result.tau(), [8 / 3, 0.0])
    # Rounds reaching depth 1: 2 of 3; depth 2: 2 of 2; depth 3: 1 of 2.
    np.testing.assert_allclose(result.acceptance_rates(), [2 / 3, 1.0, 0.5])


def test_per_depth_acceptance_counts_only_proposed_drafts():
    """Three rounds of a gamma-3 chain: one proposed a single draft and it was accepted, one accepted
    2 of 3, one 1 of 3. Depth 2 was proposed after two of the three rounds that reached depth 1 and
    accepted in one (0.5, not 1 / 3); depth 3 was proposed once and rejected."""
    rates = acceptance_by_depth(np.asarray([0, 2, 1, 0]), np.asarray([0, 1, 0, 0]))
    np.testing.assert_allclose(rates, [1.0, 0.5, 0.0])
    # No depth-2 draft proposed at all: 0, not a division by zero.
    np.testing.assert_allclose(acceptance_by_depth(np.asarray([1, 2, 0]), np.asarray([0, 2, 0])), [2 / 3, 0.0])


def test_prefill_computes_the_logits_of_each_rows_last_prompt_token_only():
    from flatspec_jax.decoding.autoregressive import prefill
    from flatspec_jax.models.masks import causal_mask

    model = random_module(lambda: create_model(ARCH), seed=3)
    prompts = jnp.asarray(np.random.default_rng(0).integers(1, ARCH.vocab_size, (2, 8)), jnp.int32)
    lengths = jnp.asarray([5, 8], jnp.int32)  # row 0 right-padded
    out, last = prefill(model, prompts, lengths, model.empty_cache(2, 16))
    assert out.logits is None, "no [B, P, V] logits: the LM head runs on the B last positions"
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    full = model(prompts, positions, causal_mask(2, 8)).logits
    np.testing.assert_allclose(np.asarray(last), np.asarray(full[jnp.arange(2), lengths - 1]), rtol=1e-5, atol=1e-5)


def test_evaluation_summary_counts_turns_prompts_and_pools_rounds():
    from flatspec_jax.evaluation import TurnRecord, summarize

    calls = itertools.count()  # each turn its own decoding call (batch size 1)

    def turn(prompt_id, turn, spec_tokens, rounds, accept_counts, same=True):
        exhausted = [0] * (len(accept_counts) - 1) + accept_counts[-1:]
        return TurnRecord(prompt_id=prompt_id, turn=turn, batch=next(calls), prompt_tokens=10,
                          ar_tokens=spec_tokens, ar_seconds=2.0,
                          spec_tokens=spec_tokens, spec_seconds=1.0, rounds=rounds, accept_counts=accept_counts,
                          exhausted_counts=exhausted, drafts=2 * rounds - 1, same_output=same)

    # Question "a" has two turns, "b" one; tau pools rounds: (5 - 1 + 3 - 1 + 7 - 1) / (2 + 1 + 3).
    summary = summarize([turn("a", 1, 5, 2, [0, 1, 1]), turn("a", 2, 3, 1, [0, 1, 0]),
                         turn("b", 1, 7, 3, [1, 0, 2], same=False)])
    assert (summary["turns"], summary["prompts"]) == (3, 2)
    assert summary["tau"] == pytest.approx(12 / 6)
    assert summary["speedup"] == pytest.approx(2.0)
    assert summary["accept_histogram"] == [1, 2, 3]
    assert summary["exhausted_histogram"] == [0, 0, 3]
    assert summary["per_depth_acceptance"] == [5 / 6, 3 / 5]  # float64, as written to eval.json
    assert summary["drafts_per_round"] == pytest.approx((3 + 1 + 5) / 6)
    assert summary["same_output_fraction"] == pytest.approx(2 / 3)
    assert [q["tau"] for q in summary["questions"]] == pytest.approx([2.0, 2.0, 2.0])


def test_a_batchs_time_counts_once_for_its_rows():
    """Two rows of one call (4 s autoregressive, 2 s speculative) and a call of one row (1 s, 1 s)."""
    from flatspec_jax.evaluation import TurnRecord, summarize

    def row(prompt_id, batch, tokens, ar_seconds, spec_seconds):
        return TurnRecord(prompt_id=prompt_id, turn=1, batch=batch, prompt_tokens=10, ar_tokens=tokens,
                          ar_seconds=ar_seconds, spec_tokens=tokens, spec_seconds=spec_seconds, rounds=3,
                          accept_counts=[1, 2], exhausted_counts=[0, 2], drafts=3, same_output=True)

    summary = summarize([row("a", 0, 6, 4.0, 2.0), row("b", 0, 10, 4.0, 2.0), row("c", 1, 5, 1.0, 1.0)])
    assert summary["tokens_per_s_ar"] == pytest.approx(21 / 5)
    assert summary["tokens_per_s_spec"] == pytest.approx(21 / 3)
    assert summary["speedup"] == pytest.approx(5 / 3)
    assert [q["speedup"] for q in summary["questions"]] == pytest.approx([2.0, 2.0, 1.0])


def test_a_capped_cache_is_warned_about_once_per_width(caplog):
    from flatspec_jax.config import DecodeConfig
    from flatspec_jax.decoding.runner import Decoder

    target = random_module(lambda: create_model(ARCH), seed=3)
    head = random_module(lambda: create_eagle_head(ARCH, 1), seed=4)
    cfg = DecodeConfig(method="tree", max_new_tokens=64, max_cache_length=128, depth=2, top_k=3, total_tokens=9)
    decoder = Decoder(target, cfg, (EOS,), 0, head=head)
    with caplog.at_level("WARNING", logger="flatspec_jax.decoding.runner"):
        assert decoder.cache_length(64) == 128
        decoder.cache_length(64)
    assert caplog.text.count("decode.max_cache_length=128 is below the 137 slots") == 1
    assert "one round of 9 verified tokens" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="flatspec_jax.decoding.runner"):
        assert decoder.cache_length(32) == 128  # 32 + 64 + 9 fits
    assert caplog.text == ""
