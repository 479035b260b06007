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
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flatspec_jax.decoding.autoregressive import GenerationSettings, generate
from flatspec_jax.decoding.speculative import (SpeculativeGeneration, SpeculativeSettings, acceptance_by_depth,
                                               proposed_by_depth, speculative_generate)
from flatspec_jax.models.eagle import create_eagle_head
from flatspec_jax.models.llama import create_model
from flatspec_jax.models.masks import causal_mask
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


def test_chain_settings_are_not_held_to_the_tree_limits():
    chain = SpeculativeSettings(GENERATION, method="chain", gamma=2, depth=1, top_k=1)  # total_tokens 62 > pool 2
    assert chain.max_accept == 2
    with pytest.raises(ValueError, match=r"total_tokens must be in 1\.\.2 "):
        SpeculativeSettings(GENERATION, method="tree", depth=1, top_k=1)


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
    # The denominators, which eval.json reports so that "none proposed" is not read as 0% accepted.
    assert proposed_by_depth(np.asarray([0, 2, 1, 0]), np.asarray([0, 1, 0, 0])).tolist() == [3, 2, 1]
    assert proposed_by_depth(np.asarray([1, 2, 0]), np.asarray([0, 2, 0])).tolist() == [3, 0]


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


def test_a_preempted_evaluation_stops_at_the_batch_the_processes_agree_on(monkeypatch):
    """In a multi-process job SIGTERM goes to JAX's preemption notifier: evaluation stops before the
    batch the processes agree on (it keeps nothing, so a re-run evaluates again) instead of running on."""
    from flatspec_jax import evaluation
    from flatspec_jax.data.prompts import Prompt
    from flatspec_jax.decoding.runner import DecodeResult
    from flatspec_jax.runtime import Preempted

    class CountingDecoder:
        calls = 0

        def prompt_width(self, length: int) -> int:
            return length

        def run(self, batch, key, width) -> DecodeResult:
            self.calls += 1
            rows = len(batch)
            return DecodeResult([np.array([5, EOS])] * rows, 0.1, np.ones(rows, np.int32), np.ones((rows, 2), np.int32),
                                np.zeros((rows, 2), np.int32), np.ones(rows, np.int32))

        def text(self, tokenizer, tokens) -> str:
            return "reply"

    checks = []
    monkeypatch.setattr(evaluation, "turn_prompt", lambda tokenizer, prompt, replies: np.arange(4))
    monkeypatch.setattr(evaluation, "reached_preemption", lambda: checks.append(len(checks)) or len(checks) == 3)
    ar, spec = CountingDecoder(), CountingDecoder()
    prompts = [Prompt(str(i), "writing", ("question",)) for i in range(4)]
    with pytest.raises(Preempted, match="preempted during evaluation after 2 batches"):
        evaluation.evaluate(prompts, None, ar, spec, warmup=0, seed=0)
    assert checks == [0, 1, 2] and ar.calls == spec.calls == 2  # one check before each batch


def test_a_later_turn_too_long_for_the_cache_ends_its_question_and_is_listed(monkeypatch, caplog):
    """A second turn's prompt holds the first reply, so its length is known only then: one that leaves no
    cache slot is skipped with its question's later turns, and the other questions' turns are decoded."""
    from flatspec_jax import evaluation
    from flatspec_jax.data.prompts import Prompt
    from flatspec_jax.decoding.runner import DecodeResult

    class FakeDecoder:
        max_prompt_tokens = 50
        widths: list[int] = []

        def prompt_width(self, length: int) -> int:
            assert length <= self.max_prompt_tokens
            self.widths.append(length)
            return length

        def run(self, batch, key, width) -> DecodeResult:
            rows = len(batch)
            return DecodeResult([np.array([5, EOS])] * rows, 0.1, np.ones(rows, np.int32), np.ones((rows, 2), np.int32),
                                np.zeros((rows, 2), np.int32), np.ones(rows, np.int32))

        def text(self, tokenizer, tokens) -> str:
            return "reply"

    def turn_prompt(tokenizer, prompt, replies):  # question "long" answers its first turn at length
        return np.arange(60 if replies and prompt.id == "long" else 4 + 8 * len(replies))

    monkeypatch.setattr(evaluation, "turn_prompt", turn_prompt)
    prompts = [Prompt("a", "writing", ("q1", "q2", "q3")), Prompt("long", "writing", ("q1", "q2", "q3")),
               Prompt("b", "writing", ("q1",))]
    with caplog.at_level("WARNING", logger="flatspec_jax.evaluation"):
        result = evaluation.evaluate(prompts, None, FakeDecoder(), FakeDecoder(), warmup=0, seed=0)
    assert [(q["prompt_id"], q["turn"]) for q in result["questions"]] == [
        ("a", 1), ("long", 1), ("b", 1), ("a", 2), ("a", 3)]
    assert result["skipped_turns"] == [{"prompt_id": "long", "turn": 2, "prompt_tokens": 60, "turns_not_decoded": 2}]
    assert "question long turn 2: its prompt with the replies so far has 60 tokens" in caplog.text
    assert result["turns"] == 5


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


# --- the draft side across rounds, against a cache-free reference ------------------------------
#
# Greedy output is the target's whatever the draft does, so a draft-side slip (the wrong feature
# row caught up, a stale draft cache, a draft run at the wrong position) shows only in how many
# drafts the rounds accept. These tests replay every round without any cache, running the head
# over (feature, next token) pairs as training does, and compare the acceptance decoding reports.

REF_LENGTHS = [3, 5, 8, 10, 12]  # five rows, different prompts
REF_SLOTS = 56  # the longest prompt + max_new_tokens + a round's drafts and bonus fit, in the replay and the cache
REF_GENERATION = GenerationSettings(max_new_tokens=32, cache_length=REF_SLOTS, eos_ids=())  # no EOS: rows run to 32
REF_METHODS = {name: dataclasses.replace(settings, generation=REF_GENERATION) for name, settings in METHODS.items()}
MIN_MARGIN = 1e-4
"""Smallest gap the replay allows at a decision it takes (the target's argmax, the draft's argmax, top-k
and keep-best cut-offs): cached and cache-free float32 runs differ by ~1e-6, so a closer call could
go either way. The head and prompts below leave 4e-4 at the closest."""


def context_head(seed: int, feature_scale: float, attention_scale: float, query_key_scale: float) -> nnx.Module:
    """The agreeing head (its draft is the LM head on ``4 embed(x_{t+1})``) with two more paths, so its
    drafts depend on more than the token and are right only part of the time: fc also reads the
    feature f_t (random weights times ``feature_scale``), and attention writes to the output (random
    o_proj times ``attention_scale``; q and k scaled by ``query_key_scale`` to sharpen it), so each
    draft depends on the draft cache's pairs and on positions too."""
    head = agreeing_head(ARCH, seed)
    noise = random_module(lambda: create_eagle_head(ARCH, 1), seed=seed + 1)
    d = ARCH.hidden_size
    fc = np.array(head.fc[...])
    fc[d:] = feature_scale * np.asarray(noise.fc[...])[d:]
    head.fc[...] = fc
    attention = head.first_layer.self_attn
    attention.o_proj[...] = attention_scale * np.asarray(noise.first_layer.self_attn.o_proj[...])
    for weight in (attention.q_proj, attention.k_proj):
        weight[...] = query_key_scale * np.asarray(weight[...])
    return head


@pytest.fixture(scope="module")
def context_pair():
    """The tiny target and a context-dependent head. Its rounds accept 0, some and all drafts: chain
    (gamma 3) 36 / 36 / 8 / 7 rounds accepting 0 / 1 / 2 / 3, tree 7 / 31 / 22 / 6, over the 5 rows."""
    target = nnx.split(random_module(lambda: create_model(ARCH), seed=3))
    head = context_head(seed=11, feature_scale=2.0, attention_scale=1.5, query_key_scale=1.5)
    return target, nnx.split(head)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def target_cache_free(graphdef, params, tokens):
    """The target over [B, W] tokens at positions 0..W-1, no cache: features [B, W, D], logits [B, W, V]."""
    batch, width = tokens.shape
    out = nnx.merge(graphdef, params)(tokens, jnp.broadcast_to(jnp.arange(width), (batch, width)),
                                      causal_mask(batch, width))
    return out.hidden, out.logits


@functools.partial(jax.jit, static_argnames=("target_graphdef", "head_graphdef"))
def head_cache_free(target_graphdef, target_params, head_graphdef, head_params, features, next_tokens):
    """The head over pairs t = (features[t], next_tokens[t]) at positions t, no cache, as training runs it:
    predicted next features [B, W, D] and draft log-probs [B, W, V]."""
    target, head = nnx.merge(target_graphdef, target_params), nnx.merge(head_graphdef, head_params)
    batch, width = next_tokens.shape
    out, _ = head(features, target.embed(next_tokens), jnp.broadcast_to(jnp.arange(width), (batch, width)),
                  causal_mask(batch, width))
    return out, jax.nn.log_softmax(target.logits(out), axis=-1)


def cut_gap(values, keep: int) -> float:
    """How far the ``keep``-th largest value lies above the next one."""
    ordered = np.sort(np.asarray(values, np.float64))[::-1]
    return float(ordered[keep - 1] - ordered[keep])


class CacheFreeRounds:
    """Greedy speculative decoding replayed round by round with cache-free forwards only.

    The target's greedy continuation is computed token by token without a cache; its features
    over the whole sequence equal, by causality, those of every committed prefix. A round with n
    committed tokens x_0..x_{n-1} and the root x_n runs the head over the committed pairs
    (f_t, x_{t+1}), t < n, followed by the draft's own pairs (predicted feature, drafted token),
    and accepts the drafts that continue the target's greedy sequence. ``margins`` collects the
    gap at every decision taken (:data:`MIN_MARGIN`).
    """

    def __init__(self, target, head, prompts: list[np.ndarray], count: int):
        """target, head: (graphdef, params); count: greedy tokens to continue each prompt with."""
        self.target, self.head, self.margins = target, head, []
        sequences = np.zeros((len(prompts), REF_SLOTS), np.int32)
        for row, prompt in enumerate(prompts):
            sequences[row, :len(prompt)] = prompt
        for step in range(count):
            logits = np.asarray(target_cache_free(*target, jnp.asarray(sequences))[1])
            for row, prompt in enumerate(prompts):
                scores = logits[row, len(prompt) - 1 + step]
                self.margins.append(cut_gap(scores, 1))
                sequences[row, len(prompt) + step] = np.argmax(scores)
        self.sequences = sequences
        self.features = np.asarray(target_cache_free(*target, jnp.asarray(sequences))[0])

    def predict(self, row: int, n: int, path_features: list, path_tokens: list) -> tuple[np.ndarray, np.ndarray]:
        """The head's predicted feature and log-probs after the committed pairs 0..n-1 and then the
        path's pairs (path_features[i], path_tokens[i])."""
        features = np.zeros(self.features.shape[1:], np.float32)
        tokens = np.zeros((REF_SLOTS,), np.int32)
        features[:n], tokens[:n] = self.features[row, :n], self.sequences[row, 1:n + 1]
        end = n + len(path_tokens)
        if path_tokens:
            features[n:end], tokens[n:end] = np.stack(path_features), path_tokens
        hidden, log_probs = head_cache_free(*self.target, *self.head, jnp.asarray(features[None]),
                                            jnp.asarray(tokens[None]))
        return np.asarray(hidden[0, end - 1]), np.asarray(log_probs[0, end - 1])

    def truth(self, row: int, n: int, depth: int) -> int:
        """The target's greedy token at depth ``depth`` (1-based) after the root x_n."""
        return int(self.sequences[row, n + depth])

    def chain_accepts(self, row: int, n: int, gamma: int) -> int:
        """gamma greedy drafts, each pair fed the head's previous prediction; the leading matches."""
        path_features, path_tokens = [], []
        for _ in range(gamma):
            hidden, log_probs = self.predict(row, n, path_features, path_tokens)
            self.margins.append(cut_gap(log_probs, 1))
            path_features.append(hidden)
            path_tokens.append(int(np.argmax(log_probs)))
        matches = [token == self.truth(row, n, depth) for depth, token in enumerate(path_tokens, 1)]
        return int(np.cumprod(matches).sum())

    def tree_accepts(self, row: int, n: int, k: int, depth: int, total: int) -> int:
        """EAGLE-2 (``topK_genrate``): the root's top-k children, then ``depth`` times the k best beams by
        cumulative log-prob each propose their top-k; the ``total`` best of the whole pool form the
        tree, and greedy verification accepts its longest path spelling the target's continuation."""
        def children(path_features, path_tokens):
            hidden, log_probs = self.predict(row, n, path_features, path_tokens)
            self.margins.append(cut_gap(log_probs, k))
            best = np.argsort(-log_probs, kind="stable")[:k]
            return hidden, [(int(token), float(log_probs[token])) for token in best]

        root_hidden, root_children = children([], [])
        # Pool entries: (cumulative log-prob, token, parent's pool index or -1). Beams: (pool index,
        # the path's tokens, the feature paired with each of them).
        pool = [(score, token, -1) for token, score in root_children]
        beams = [(index, [token], [root_hidden]) for index, (token, _) in enumerate(root_children)]
        for _ in range(depth):
            candidates = []
            for index, path_tokens, path_features in beams:
                hidden, proposed = children(path_features, path_tokens)
                for token, log_prob in proposed:
                    candidates.append((len(pool), path_tokens + [token], path_features + [hidden]))
                    pool.append((pool[index][0] + log_prob, token, index))
            scores = [pool[index][0] for index, *_ in candidates]
            self.margins.append(cut_gap(scores, k))
            beams = [candidates[i] for i in sorted(range(len(candidates)), key=lambda i: -scores[i])[:k]]
        self.margins.append(cut_gap([score for score, *_ in pool], total))
        kept = sorted(range(len(pool)), key=lambda i: -pool[i][0])[:total]
        node, accepted = -1, 0
        while True:
            # Siblings hold distinct tokens, so at most one kept child continues the target.
            following = [i for i in kept if pool[i][2] == node and pool[i][1] == self.truth(row, n, accepted + 1)]
            if not following:
                return accepted
            node, accepted = following[0], accepted + 1

    def run(self, settings: SpeculativeSettings, prompt_lengths: list[int]) -> list[list[int]]:
        """Per row, the accepted drafts of each round until max_new_tokens are emitted (the settings
        have no EOS and room in the cache for every round)."""
        accepts = []
        for row, prompt_length in enumerate(prompt_lengths):
            row_accepts, emitted = [], 1  # the prefill's token, x_P, is the first root
            while emitted < settings.generation.max_new_tokens:
                n = prompt_length + emitted - 1
                if settings.method == "chain":
                    accepted = self.chain_accepts(row, n, settings.gamma)
                else:
                    accepted = self.tree_accepts(row, n, settings.top_k, settings.depth, settings.total_tokens)
                row_accepts.append(accepted)
                emitted += accepted + 1
            accepts.append(row_accepts)
        return accepts


@pytest.mark.parametrize("method", sorted(REF_METHODS))
def test_greedy_acceptance_matches_a_cache_free_replay_round_by_round(context_pair, method):
    """Per row, the number of rounds and the histogram of drafts accepted per round equal the replay's.

    The result exposes no per-round sequence, but a slip on the draft side (the wrong target feature
    row, a stale draft cache entry, a wrong catch-up or drafting position) changes some rows' counts."""
    settings = REF_METHODS[method]
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, ARCH.vocab_size, length).astype(np.int32) for length in REF_LENGTHS]
    padded = np.zeros((len(prompts), max(REF_LENGTHS)), np.int32)
    for row, prompt in enumerate(prompts):
        padded[row, :len(prompt)] = prompt
    target, head = context_pair
    result = speculative_generate(*target, *head, jnp.asarray(padded), jnp.asarray(REF_LENGTHS, jnp.int32),
                                  jax.random.key(0), settings)

    new_tokens = REF_GENERATION.max_new_tokens
    replay = CacheFreeRounds(target, head, prompts, new_tokens + settings.max_accept)
    accepts = replay.run(settings, REF_LENGTHS)
    assert min(replay.margins) > MIN_MARGIN
    every_round = np.concatenate(accepts)
    assert {0, 1, settings.max_accept - 1, settings.max_accept} <= set(every_round.tolist())  # a test of something
    for row, (row_accepts, prompt_length) in enumerate(zip(accepts, REF_LENGTHS)):
        np.testing.assert_array_equal(result.tokens[row], replay.sequences[row, prompt_length:][:new_tokens])
        assert int(result.rounds[row]) == len(row_accepts), f"row {row}: rounds accepting {row_accepts}"
        histogram = np.bincount(row_accepts, minlength=settings.max_accept + 1)
        np.testing.assert_array_equal(result.accept_counts[row], histogram, err_msg=f"row {row}: rounds accepting "
                                      f"{row_accepts}")
