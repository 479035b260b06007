"""The chunked loss through the frozen LM head equals `draft_loss` on materialised logits.

Small random arrays (vocab 50, hidden 16, rows of 37 positions); each case checks the loss,
every LossTerms field and the gradient w.r.t. the draft features against `draft_loss` applied
to logits computed with the same head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flatspec_jax.models.llama import lm_head_logits
from flatspec_jax.train.head_loss import draft_loss_through_head
from flatspec_jax.train.losses import TOKEN_LOSSES, draft_loss

ROWS, LENGTH, HIDDEN, VOCAB = 3, 37, 16, 50
TOL = 1e-5


def arrays(seed: int = 0, trained_fraction: float = 0.5):
    rng = np.random.default_rng(seed)
    weight = jnp.asarray(rng.standard_normal((VOCAB, HIDDEN), np.float32))
    pred = jnp.asarray(rng.standard_normal((ROWS, LENGTH, HIDDEN), np.float32))
    target = jnp.asarray(rng.standard_normal((ROWS, LENGTH, HIDDEN), np.float32))
    mask = rng.random((ROWS, LENGTH)) < trained_fraction
    mask[0, 25:] = False  # a long untrained tail: whole chunks to skip
    mask[1] = False  # a row without trained positions
    mask[2, -1] = True  # the last position, inside the padded last chunk
    return pred, target, weight, jnp.asarray(mask)


def both(name: str, pred, target, weight, mask, chunk: int, weights=(1.0, 0.3)):
    """(loss, terms, grad w.r.t. pred) of the reference and of the chunked loss, each jitted."""
    settings = {"token_loss": name, "feature_weight": weights[0], "token_weight": weights[1]}

    def reference(p):
        return draft_loss(p, target, lm_head_logits(p, weight), lm_head_logits(target, weight), mask, **settings)

    def chunked(p):
        return draft_loss_through_head(p, target, weight, mask, chunk=chunk, **settings)

    results = []
    for fn in (reference, chunked):
        (loss, terms), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(pred)
        results.append((loss, terms, grad))
    return results


def assert_close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=TOL, atol=TOL * 1e-2)


@pytest.mark.parametrize("name", list(TOKEN_LOSSES))
@pytest.mark.parametrize("chunk", [1, 8, 37, 64])
def test_equals_draft_loss_on_logits(name, chunk):
    """Chunk sizes that divide the row (1, 37), that do not (8) and that exceed it (64)."""
    (loss_a, terms_a, grad_a), (loss_b, terms_b, grad_b) = both(name, *arrays(), chunk=chunk)
    assert_close(loss_b, loss_a)
    for field in terms_a._fields:
        assert_close(getattr(terms_b, field), getattr(terms_a, field))
    assert float(jnp.max(jnp.abs(grad_a))) > 1e-3  # a gradient worth comparing
    assert_close(grad_b, grad_a)


def test_untrained_positions_neither_count_nor_get_gradient():
    pred, target, weight, mask = arrays(seed=1)
    clean = both("eagle", pred, target, weight, mask, chunk=8)[1]
    # Untrained positions of computed chunks (and of skipped ones) changed to extreme values.
    changed = jnp.where(mask[..., None], pred, 1e4 * jnp.sign(pred))
    loss, terms, grad = both("eagle", changed, target, weight, mask, chunk=8)[1]
    assert_close(terms.token, clean[1].token)
    assert_close(terms.top1, clean[1].top1)
    assert np.all(np.asarray(grad)[~np.asarray(mask)] == 0)
    assert_close(grad, clean[2])


def test_without_differentiation_returns_the_same_values():
    pred, target, weight, mask = arrays(seed=2)
    loss_grad, terms_grad, _ = both("kl", pred, target, weight, mask, chunk=8)[1]
    loss, terms = jax.jit(lambda p: draft_loss_through_head(p, target, weight, mask, token_loss="kl",
                                                            feature_weight=1.0, token_weight=0.3, chunk=8))(pred)
    assert_close(loss, loss_grad)
    for field in terms._fields:
        assert_close(getattr(terms, field), getattr(terms_grad, field))


@pytest.mark.parametrize("name", ["eagle", "lk"])
def test_agreement_flag_keeps_loss_and_gradient_and_only_drops_the_metrics(name):
    """One compilation (the flag is traced) serves both; without it the metrics are NaN."""
    pred, target, weight, mask = arrays(seed=5)
    traces = []

    def fn(p, agreement):
        traces.append(None)
        return draft_loss_through_head(p, target, weight, mask, token_loss=name, feature_weight=1.0,
                                       token_weight=0.3, chunk=8, agreement=agreement)

    step = jax.jit(jax.value_and_grad(fn, has_aux=True))
    (loss_on, terms_on), grad_on = step(pred, True)
    (loss_off, terms_off), grad_off = step(pred, False)
    assert len(traces) == 1
    assert float(loss_off) == float(loss_on)
    assert float(terms_off.feature) == float(terms_on.feature) and float(terms_off.token) == float(terms_on.token)
    np.testing.assert_array_equal(np.asarray(grad_off), np.asarray(grad_on))
    assert all(np.isnan(float(getattr(terms_off, f))) for f in ("acceptance", "top1", "top3"))
    reference = both(name, pred, target, weight, mask, chunk=8)[0][1]
    for field in ("acceptance", "top1", "top3"):
        assert_close(getattr(terms_on, field), getattr(reference, field))


def test_no_gradient_reaches_the_head_or_the_target_features():
    pred, target, weight, mask = arrays(seed=3)

    def loss(p, t, w):
        return draft_loss_through_head(p, t, w, mask, token_loss="eagle", feature_weight=1.0, token_weight=0.1,
                                       chunk=8)[0]

    _, grad_target, grad_weight = jax.grad(loss, argnums=(0, 1, 2))(pred, target, weight)
    assert np.all(np.asarray(grad_target) == 0)
    assert np.all(np.asarray(grad_weight) == 0)


def test_bfloat16_features_match_the_reference():
    pred, target, weight, mask = arrays(seed=4)
    pred, target = pred.astype(jnp.bfloat16), target.astype(jnp.bfloat16)
    (loss_a, _, grad_a), (loss_b, _, grad_b) = both("eagle", pred, target, weight, mask, chunk=8)
    assert grad_b.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=1e-3)
    np.testing.assert_allclose(np.asarray(grad_b, np.float32), np.asarray(grad_a, np.float32), rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("bad", [{"chunk": 0}, {"token_loss": "mse"}])
def test_invalid_settings_are_named(bad):
    pred, target, weight, mask = arrays()
    settings = {"token_loss": "eagle", "feature_weight": 1.0, "token_weight": 0.1, "chunk": 8, **bad}
    with pytest.raises(ValueError, match="chunk|mse"):
        draft_loss_through_head(pred, target, weight, mask, **settings)


DRAFT_IDS = np.array([0, 3, 4, 9, 17, 18, 30, 41, 49], np.int32)
"""A reduced draft vocabulary: 9 of the 50 tokens."""


@pytest.mark.parametrize("name", list(TOKEN_LOSSES))
def test_reduced_draft_vocab_trains_on_those_tokens_distributions(name):
    """The loss, its terms and the gradient are `draft_loss` on the draft vocabulary's logit columns
    (both distributions renormalised over those tokens)."""
    pred, target, weight, mask = arrays(seed=6)
    settings = {"token_loss": name, "feature_weight": 1.0, "token_weight": 0.3}
    ids = jnp.asarray(DRAFT_IDS)

    def reference(p):
        return draft_loss(p, target, lm_head_logits(p, weight)[..., ids], lm_head_logits(target, weight)[..., ids],
                          mask, **settings)

    def reduced(p):
        return draft_loss_through_head(p, target, weight, mask, chunk=8, draft_ids=ids, **settings)

    (loss_a, terms_a), grad_a = jax.jit(jax.value_and_grad(reference, has_aux=True))(pred)
    (loss_b, terms_b), grad_b = jax.jit(jax.value_and_grad(reduced, has_aux=True))(pred)
    assert_close(loss_b, loss_a)
    assert_close(terms_b.token, terms_a.token)
    assert_close(terms_b.feature, terms_a.feature)
    assert float(jnp.max(jnp.abs(grad_a))) > 1e-3
    assert_close(grad_b, grad_a)
    full = draft_loss_through_head(pred, target, weight, mask, chunk=8, **settings)[1]
    assert abs(float(full.token) - float(terms_b.token)) > 1e-3  # the reduction changes the token term


def test_reduced_draft_vocab_metrics_judge_the_draft_against_the_full_target_distribution():
    """Acceptance sum_j min(p[id_j], q_j), top-1 / top-3 hits of the target's full-vocabulary argmax
    among the draft's picks (ids): a target argmax the draft cannot propose is a miss."""
    pred, target, weight, mask = arrays(seed=7)
    _, terms = draft_loss_through_head(pred, target, weight, mask, token_loss="eagle", feature_weight=1.0,
                                       token_weight=0.1, chunk=8, draft_ids=jnp.asarray(DRAFT_IDS))
    w = np.asarray(weight, np.float64)
    p = jax.nn.softmax(np.asarray(target, np.float64) @ w.T, axis=-1)
    draft_logits = np.asarray(pred, np.float64) @ w[DRAFT_IDS].T
    q = jax.nn.softmax(draft_logits, axis=-1)
    best = np.argmax(p, axis=-1)
    picks = DRAFT_IDS[np.argsort(-draft_logits, axis=-1, kind="stable")]
    expected = {"acceptance": np.minimum(p[..., DRAFT_IDS], q).sum(-1), "top1": picks[..., 0] == best,
                "top3": (picks[..., :3] == best[..., None]).any(-1)}
    trained = np.asarray(mask, np.float64)
    outside = ~np.isin(best, DRAFT_IDS) & (trained > 0)
    assert 0 < outside.sum() < trained.sum()  # some target argmaxes the draft cannot propose, not all
    for field, values in expected.items():
        want = (np.asarray(values, np.float64) * trained).sum() / (trained.sum() + 1e-5)
        np.testing.assert_allclose(float(getattr(terms, field)), want, rtol=1e-5, atol=1e-7)
    restricted_top1 = (picks[..., 0] == DRAFT_IDS[np.argmax(p[..., DRAFT_IDS], -1)]) * trained
    assert abs(restricted_top1.sum() / trained.sum() - float(terms.top1)) > 0.05  # not judged within the subset


def test_whole_vocabulary_as_draft_vocab_changes_nothing():
    pred, target, weight, mask = arrays(seed=8)
    settings = {"token_loss": "kl", "feature_weight": 1.0, "token_weight": 0.3, "chunk": 8}
    loss_a, terms_a = draft_loss_through_head(pred, target, weight, mask, **settings)
    loss_b, terms_b = draft_loss_through_head(pred, target, weight, mask, draft_ids=jnp.arange(VOCAB), **settings)
    assert_close(loss_b, loss_a)
    for field in terms_a._fields:
        assert_close(getattr(terms_b, field), getattr(terms_a, field))
