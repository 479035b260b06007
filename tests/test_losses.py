"""Tests for flatspec_jax.train.losses against float64 NumPy formulas and analytic gradients.

The NumPy reference writes every term literally from the probabilities (softmax first, then
the sum over the vocabulary); the library works from log-softmaxes and shares them between
terms, so agreement checks the algebra. Gradients are checked three ways: numerically
(`jax.test_util.check_grads` in float64) where the function is smooth and has no
stop-gradient; against closed forms (TV's sign formula, the REINFORCE expressions of TVD++)
where it is piecewise or a surrogate; and against a copy with the stop-gradient parts frozen
as constants where the value depends on quantities that must not be differentiated.
"""

from __future__ import annotations

import functools
import math
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from flatspec_jax.train.losses import (
    TOKEN_LOSSES,
    LossTerms,
    acceptance_rate,
    agreement_terms,
    draft_loss,
    forward_kl,
    lk_acceptance,
    lk_hybrid,
    masked_mean,
    smooth_l1,
    soft_cross_entropy,
    total_variation,
    tvd_plus_plus,
)

B, T = 2, 3
RTOL, ATOL = 2e-5, 2e-6  # float32 results vs float64 references of O(1) quantities
NAMES = ("eagle", "kl", "tvd", "tvdpp", "lk", "lk_hybrid")


# ------------------------------------------------------------------------------ references


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    s = z - z.max(-1, keepdims=True)
    return s - np.log(np.exp(s).sum(-1, keepdims=True))


def np_terms(draft: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """Every per-position token term, written literally from p and q (float64)."""
    log_p, log_q = np_log_softmax(target), np_log_softmax(draft)
    p, q = np.exp(log_p), np.exp(log_q)
    alpha = np.minimum(p, q).sum(-1)
    kl = (p * (log_p - log_q)).sum(-1)
    lam = np.exp(-3.0 * alpha)
    return {
        "eagle": -(p * log_q).sum(-1),
        "kl": kl,
        "tvd": 0.5 * np.abs(p - q).sum(-1),
        "alpha": alpha,
        "lk": -np.log(np.maximum(alpha, 1e-5)),
        "lk_hybrid": lam * kl + (1 - lam) * (1 - alpha),
        "entropy": -(p * log_p).sum(-1),
    }


def np_advantage(draft, target, mask=None, normalize="vocab"):
    """TVD++'s standardised reward r~ [B, T, V] (float64), Bessel-corrected std."""
    p, q = np.exp(np_log_softmax(target)), np.exp(np_log_softmax(draft))
    r = (p > q).astype(np.float64)
    if normalize == "vocab":
        mean, std = r.mean(-1, keepdims=True), r.std(-1, ddof=1, keepdims=True)
    else:
        chosen = r[np.asarray(mask).astype(bool)].ravel()  # trained (position, token) pairs
        mean, std = chosen.mean(), chosen.std(ddof=1)
    return (r - mean) / (std + 1e-5)


def np_tvdpp(draft, target, mask=None, weighting="q", normalize="vocab"):
    adv = np_advantage(draft, target, mask, normalize)
    log_q = np_log_softmax(draft)
    if weighting == "uniform":
        return -(adv * log_q).mean(-1)
    return -(np.exp(log_q) * adv * log_q).sum(-1)


def np_smooth_l1(pred, target, beta=1.0):
    d = np.asarray(pred, np.float64) - np.asarray(target, np.float64)
    a = np.abs(d)
    if beta == 0:
        return a.mean(-1)
    return np.where(a < beta, 0.5 * d * d / beta, a - 0.5 * beta).mean(-1)


def logits_pair(vocab: int, seed: int = 0, dtype=np.float32):
    """Random draft/target logits [B, T, V] with two special positions:
    [0, 0] has p == q exactly (same logits), [1, 2] has a nearly one-hot p (gap 40 nats)."""
    rng = np.random.default_rng(seed)
    draft = rng.normal(size=(B, T, vocab)) * 2.0
    target = rng.normal(size=(B, T, vocab)) * 2.0
    target[0, 0] = draft[0, 0]
    target[1, 2] = 0.0
    target[1, 2, vocab // 2] = 40.0
    return draft.astype(dtype), target.astype(dtype)


def trained_mask() -> np.ndarray:
    """[B, T] with two untrained positions, [0, 2] and [1, 0]."""
    mask = np.ones((B, T), np.float32)
    mask[0, 2] = mask[1, 0] = 0.0
    return mask


def smooth_pair(vocab: int, seed: int = 0, dtype=np.float64):
    """`logits_pair` without exact ties p_v == q_v, where TV and alpha have kinks."""
    draft, target = logits_pair(vocab, seed, dtype)
    target[0, 0, 0] += 0.5
    return draft, target


# Tests call jitted functions: eager dispatch compiles every primitive separately, which
# would dominate the run time of these tiny tests. Functions of the same shapes share compiles.
PUBLIC = {
    "eagle": jax.jit(soft_cross_entropy),
    "kl": jax.jit(forward_kl),
    "tvd": jax.jit(total_variation),
    "alpha": jax.jit(acceptance_rate),
    "lk": jax.jit(lk_acceptance),
    "lk_hybrid": jax.jit(lk_hybrid),
}
tvdpp = jax.jit(tvd_plus_plus, static_argnames=("weighting", "normalize"))
TVDPP_OPTIONS = [(w, n) for w in ("uniform", "q") for n in ("vocab", "batch")]


@jax.jit
def all_terms(draft, target):
    return {name: fn(draft, target) for name, fn in PUBLIC.items()}


@jax.jit
def all_tvdpp(draft, target, mask):
    return {f"{w}/{n}": tvd_plus_plus(draft, target, mask, weighting=w, normalize=n) for w, n in TVDPP_OPTIONS}


def sum_grad(fn, argnums=0):
    """Jitted gradient of fn(...).sum() (the per-position terms are independent)."""
    return jax.jit(jax.grad(lambda *args: fn(*args).sum(), argnums=argnums))


# ------------------------------------------------------------------------------ values


@pytest.mark.parametrize("vocab", [7, 13])
def test_token_terms_match_numpy(vocab):
    draft, target = logits_pair(vocab, seed=vocab)
    got = all_terms(jnp.asarray(draft), jnp.asarray(target))
    want = np_terms(draft, target)
    for name in PUBLIC:
        assert got[name].shape == (B, T) and got[name].dtype == jnp.float32, name
        np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("vocab", [7, 13])
def test_equal_distributions_and_one_hot_target(vocab):
    draft, target = logits_pair(vocab, seed=vocab)
    got = {k: np.asarray(v) for k, v in all_terms(jnp.asarray(draft), jnp.asarray(target)).items()}
    # p == q at [0, 0]: zero divergences, full acceptance.
    for name in ("kl", "tvd", "lk", "lk_hybrid"):
        assert abs(got[name][0, 0]) < 1e-6, name
    assert abs(got["alpha"][0, 0] - 1.0) < 1e-6
    # Nearly one-hot p at [1, 2]: soft CE (and L_alpha) is the hard CE of the argmax token.
    hard_ce = -np_log_softmax(draft[1, 2])[vocab // 2]
    assert got["eagle"][1, 2] == pytest.approx(hard_ce, rel=1e-5, abs=1e-5)
    assert got["lk"][1, 2] == pytest.approx(hard_ce, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("vocab", [7, 13])
def test_tvdpp_matches_numpy(vocab):
    draft, target = logits_pair(vocab, seed=vocab + 1)
    mask = trained_mask()
    got = all_tvdpp(jnp.asarray(draft), jnp.asarray(target), jnp.asarray(mask))
    for weighting, normalize in TVDPP_OPTIONS:
        key = f"{weighting}/{normalize}"
        want = np_tvdpp(draft, target, mask, weighting, normalize)
        np.testing.assert_allclose(np.asarray(got[key]), want, rtol=1e-4, atol=1e-5, err_msg=key)


def test_tvdpp_default_is_registry_entry_and_options_validated():
    draft, target = logits_pair(13, seed=3)
    mask = jnp.asarray(trained_mask())
    d, t = jnp.asarray(draft), jnp.asarray(target)
    np.testing.assert_array_equal(np.asarray(jax.jit(TOKEN_LOSSES["tvdpp"])(d, t, mask)),
                                  np.asarray(all_tvdpp(d, t, mask)["q/vocab"]))
    with pytest.raises(ValueError, match="weighting"):
        tvdpp(d, t, weighting="sampled")
    with pytest.raises(ValueError, match="normalize"):
        tvdpp(d, t, normalize="row")
    with pytest.raises(ValueError, match="mask"):
        tvdpp(d, t, normalize="batch")


# Property tests: logits on a grid of 2^-15 with |z| < 256, so that adding an integer |c| <= 100 is exact in
# float32 (|z + c| < 2^9, 9 + 15 = 24 bits) and a shifted input differs from the original only through the code.
GRID = 2.0**15


@st.composite
def random_logit_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """float32 draft and target logits [B, T, V], V in 2..64, each of its own scale in 1e-3..50; sometimes
    with p == q at [0, 0]."""
    vocab = draw(st.integers(2, 64))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def logits() -> np.ndarray:
        scale = 10.0 ** draw(st.floats(-3.0, math.log10(50.0)))
        z = rng.standard_normal((B, T, vocab)) * scale
        return np.clip(np.round(z * GRID) / GRID, -255.0, 255.0).astype(np.float32)

    draft, target = logits(), logits()
    if draw(st.booleans()):
        target[0, 0] = draft[0, 0]
    return draft, target


@settings(deadline=None, max_examples=40)
@given(pair=random_logit_pairs())
def test_identities(pair):
    """KL >= 0, 0 <= TV <= 1, alpha = 1 - TV, L_alpha = -log max(alpha, 1e-5), soft CE - KL = H(p)."""
    draft, target = pair
    got = {k: np.asarray(v, np.float64) for k, v in all_terms(jnp.asarray(draft), jnp.asarray(target)).items()}
    kl, tvd, alpha, lk, ce = got["kl"], got["tvd"], got["alpha"], got["lk"], got["eagle"]
    # float32 sums of O(1) terms that cancel to ~0 may land a few ulps outside the bounds, no further.
    assert np.all(kl >= -ATOL), kl.min()
    assert np.all(tvd >= 0) and np.all(tvd <= 1 + ATOL), (tvd.min(), tvd.max())
    np.testing.assert_allclose(tvd, 1.0 - alpha, atol=ATOL)
    # lk from alpha, floored; also against TV: 1 - tvd from a float32 tvd ~ 1 is only absolutely accurate,
    # so there the comparison is of exp(-lk).
    np.testing.assert_allclose(lk, -np.log(np.maximum(alpha, 1e-5)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.exp(-lk), np.maximum(1.0 - tvd, 1e-5), atol=ATOL)
    # Soft CE and KL each carry float32 rounding relative to their size (|log q| reaches hundreds), which
    # their difference keeps: a few ulps of the soft CE (seen: < 2 ulps beyond ATOL).
    entropy = np_terms(draft, target)["entropy"]
    np.testing.assert_array_less(np.abs(ce - kl - entropy), ATOL + 1e-6 * np.abs(ce))


@jax.jit
def registry_terms(draft, target, mask):
    terms = {name: fn(draft, target, mask) for name, fn in TOKEN_LOSSES.items()}
    return {"alpha": acceptance_rate(draft, target), **terms}


@settings(deadline=None, max_examples=40)
@given(pair=random_logit_pairs(), seed=st.integers(0, 2**32 - 1))
def test_token_losses_ignore_a_constant_added_to_either_logit_vector(pair, seed):
    """Every token loss (and alpha) depends on the logits only through the softmaxes: a constant per position
    added to the draft's or to the target's logits changes nothing (the exactly representable shift leaves
    no rounding to tolerate)."""
    draft, target = pair
    shifts = np.random.default_rng(seed).integers(-100, 101, (2, B, T, 1)).astype(np.float32)
    mask = jnp.asarray(trained_mask())
    plain = registry_terms(jnp.asarray(draft), jnp.asarray(target), mask)
    for shifted in (registry_terms(jnp.asarray(draft + shifts[0]), jnp.asarray(target), mask),
                    registry_terms(jnp.asarray(draft), jnp.asarray(target + shifts[1]), mask)):
        for name, value in plain.items():
            np.testing.assert_allclose(np.asarray(shifted[name]), np.asarray(value), rtol=1e-6, atol=1e-7,
                                       err_msg=name)


def test_zero_probability_tokens_are_safe():
    """A -inf target logit (p = 0) contributes 0 to CE/KL, without NaN in value or gradient."""
    draft, target = logits_pair(7, seed=4)
    target[:, :, 2] = -np.inf
    finite = target.copy()
    finite[:, :, 2] = -1e4  # exp(-1e4) = 0 even in float64: the same distribution
    d, t, f = jnp.asarray(draft), jnp.asarray(target), jnp.asarray(finite)

    @jax.jit
    def values_and_grads(d, t):
        return {name: (PUBLIC[name](d, t), sum_grad(PUBLIC[name])(d, t)) for name in ("eagle", "kl", "lk_hybrid")}

    with_inf, with_finite = values_and_grads(d, t), values_and_grads(d, f)
    for name, (value, grad) in with_inf.items():
        np.testing.assert_allclose(np.asarray(value), np.asarray(with_finite[name][0]), rtol=1e-6, err_msg=name)
        assert np.all(np.isfinite(np.asarray(value))) and np.all(np.isfinite(np.asarray(grad))), name
        np.testing.assert_allclose(np.asarray(grad), np.asarray(with_finite[name][1]), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ gradients


def test_lk_acceptance_is_floored_where_the_distributions_do_not_overlap():
    """alpha = 0 in float32 (disjoint supports: each side's other tokens underflow) gives
    L_alpha = -log(1e-5), finite with a finite gradient, instead of -log 0 = inf; above the floor it is -log alpha."""
    draft, target = logits_pair(7, seed=8)
    draft[0, 0], target[0, 0] = np.eye(7)[1] * 200.0, np.eye(7)[4] * 200.0  # p, q one-hot on different tokens
    d, t = jnp.asarray(draft), jnp.asarray(target)
    value, grad = np.asarray(PUBLIC["lk"](d, t)), np.asarray(sum_grad(PUBLIC["lk"])(d, t))
    assert float(PUBLIC["alpha"](d, t)[0, 0]) == 0.0
    np.testing.assert_allclose(value[0, 0], -np.log(1e-5), rtol=1e-6)
    np.testing.assert_allclose(value.ravel()[1:], np_terms(draft, target)["lk"].ravel()[1:], rtol=RTOL, atol=ATOL)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("name", ["eagle", "kl", "lk"])
def test_check_grads_smooth_terms(name):
    with jax.enable_x64(True):
        draft, target = smooth_pair(7, seed=5)
        t = jnp.asarray(target)
        check_grads(jax.jit(lambda z: PUBLIC[name](z, t)), (jnp.asarray(draft),), order=1, modes=("rev",))


def test_lk_hybrid_gradient_treats_lambda_as_constant():
    with jax.enable_x64(True):
        draft, target = smooth_pair(7, seed=6)
        d, t = jnp.asarray(draft), jnp.asarray(target)
        lam = jnp.exp(-3.0 * PUBLIC["alpha"](d, t))  # frozen at the evaluation point

        @jax.jit
        def frozen(z):
            return lam * PUBLIC["kl"](z, t) + (1 - lam) * PUBLIC["tvd"](z, t)

        check_grads(frozen, (d,), order=1, modes=("rev",))
        np.testing.assert_allclose(np.asarray(PUBLIC["lk_hybrid"](d, t)), np.asarray(frozen(d)), rtol=1e-12)
        got = sum_grad(PUBLIC["lk_hybrid"])(d, t)
        np.testing.assert_allclose(np.asarray(got), np.asarray(sum_grad(frozen)(d)),
                                   rtol=1e-10, atol=1e-12)
        # lambda really is stop-gradient: the full derivative (finite differences) differs.
        e = np.zeros_like(draft)
        e[0, 1, 0] = 1e-6
        numeric = (PUBLIC["lk_hybrid"](d + e, t) - PUBLIC["lk_hybrid"](d - e, t)).sum() / 2e-6
        assert abs(float(numeric) - float(got[0, 1, 0])) > 1e-4


def test_tvd_gradient_is_sign_formula():
    with jax.enable_x64(True):
        draft, target = smooth_pair(13, seed=7)
        d, t = jnp.asarray(draft), jnp.asarray(target)
        got = np.asarray(sum_grad(PUBLIC["tvd"])(d, t))
        p, q = np.exp(np_log_softmax(target)), np.exp(np_log_softmax(draft))
        s = np.sign(q - p)
        assert np.all(s != 0)
        # dq_v/dz_j = q_v (delta_vj - q_j)  =>  1/2 sum_v s_v dq_v/dz_j = 1/2 q_j (s_j - sum_v s_v q_v)
        want = 0.5 * q * (s - (s * q).sum(-1, keepdims=True))
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)


def test_tvdpp_q_weighting_gradient_is_reinforce_and_scaled_tvd():
    with jax.enable_x64(True):
        draft, target = smooth_pair(13, seed=8)
        d, t = jnp.asarray(draft), jnp.asarray(target)
        got = np.asarray(sum_grad(functools.partial(tvdpp, weighting="q"))(d, t))
        q = np.exp(np_log_softmax(draft))
        adv = np_advantage(draft, target)
        # -sum_x q(x) r~(x) grad_z log q(x), with grad_z log q(x) = e_x - q.
        want = -(q * adv - q * (q * adv).sum(-1, keepdims=True))
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
        # ... which is TV's gradient divided by (std r + eps), position by position.
        p = np.exp(np_log_softmax(target))
        std = (p > q).astype(np.float64).std(-1, ddof=1, keepdims=True)
        grad_tv = np.asarray(sum_grad(PUBLIC["tvd"])(d, t))
        np.testing.assert_allclose(got, grad_tv / (std + 1e-5), rtol=1e-9, atol=1e-14)


def test_tvdpp_uniform_gradient_is_minus_advantage_over_vocab():
    vocab = 13
    with jax.enable_x64(True):
        draft, target = smooth_pair(vocab, seed=9)
        d, t = jnp.asarray(draft), jnp.asarray(target)
        got = np.asarray(sum_grad(functools.partial(tvdpp, weighting="uniform"))(d, t))
        q = np.exp(np_log_softmax(draft))
        adv = np_advantage(draft, target)
        np.testing.assert_allclose(got, -(adv - q * adv.sum(-1, keepdims=True)) / vocab, atol=1e-14)
        np.testing.assert_allclose(adv.sum(-1), 0.0, atol=1e-12)
        np.testing.assert_allclose(got, -adv / vocab, atol=1e-12)


@functools.cache
def reward_gradient_cases():
    """For every TVD++ option: (loss, grad w.r.t. draft, grad w.r.t. target) of the library and
    (loss, grad) of a surrogate whose reward (and q weights) are precomputed constants. One jit
    for all four options keeps the compile count down."""
    with jax.enable_x64(True):
        draft, target = smooth_pair(13, seed=10)
        mask = trained_mask()
        d, t, m = jnp.asarray(draft), jnp.asarray(target), jnp.asarray(mask)
        advantages = {(w, n): jnp.asarray(np_advantage(draft, target, mask, n)) for w, n in TVDPP_OPTIONS}
        q_const = jnp.exp(jax.nn.log_softmax(d))

        @jax.jit
        def run(d, t, advantages):
            out = {}
            for weighting, normalize in TVDPP_OPTIONS:
                adv = advantages[weighting, normalize]

                def constant_reward(z, adv=adv, weighting=weighting):
                    log_q = jax.nn.log_softmax(z)
                    weights = 1.0 / z.shape[-1] if weighting == "uniform" else q_const
                    return masked_mean(-(weights * adv * log_q).sum(-1), m)

                def loss(z, tt, weighting=weighting, normalize=normalize):
                    return masked_mean(tvd_plus_plus(z, tt, m, weighting=weighting, normalize=normalize), m)

                value, grads = jax.value_and_grad(loss, argnums=(0, 1))(d, t)
                out[weighting, normalize] = (value, *grads, *jax.value_and_grad(constant_reward)(d))
            return out

        return jax.tree.map(np.asarray, run(d, t, advantages))


@pytest.mark.parametrize("option", TVDPP_OPTIONS, ids="/".join)
def test_tvdpp_reward_carries_no_gradient(option):
    """Same value and gradient as a surrogate with a constant reward; nothing reaches the target."""
    value, grad, grad_target, const_value, const_grad = reward_gradient_cases()[option]
    np.testing.assert_allclose(value, const_value, rtol=1e-12)
    np.testing.assert_allclose(grad, const_grad, rtol=1e-10, atol=1e-14)
    assert np.any(grad) and not np.any(grad_target)


def test_tvdpp_equal_rewards_give_zero_loss_and_gradient():
    # p == q, both exactly one-hot in float32 (exp(-200) underflows): r = 1[p > q] = 0 for
    # every token whatever the rounding, so std r = 0. (For merely equal logits, p > q at a
    # near-tie is decided by rounding, which can differ between the draft and target paths.)
    rng = np.random.default_rng(11)
    d = jnp.asarray(200.0 * np.eye(7, dtype=np.float32)[rng.integers(0, 7, size=(B, T))])
    mask = jnp.ones((B, T))
    values = all_tvdpp(d, d, mask)
    grads = jax.jit(lambda z: {key: jax.grad(lambda z, key=key: all_tvdpp(z, d, mask)[key].sum())(z)
                               for key in values})(d)
    for key, value in values.items():
        assert not np.any(np.asarray(value)), key  # finite: not 0 / 0
        assert not np.any(np.asarray(grads[key])), key


def test_tvdpp_batch_statistics_ignore_untrained_positions():
    draft, target = logits_pair(13, seed=12)
    mask = trained_mask()
    m = jnp.asarray(mask)

    def loss(dr, tg):
        return float(masked_mean(tvdpp(jnp.asarray(dr), jnp.asarray(tg), m, normalize="batch"), m))

    # At the untrained positions [0, 2] and [1, 0], set p == q exactly one-hot (exp(-200)
    # underflows), so all their rewards become 0. A binary reward's mean and std depend only on
    # the number of ones, so this change would move the batch statistics if they were counted.
    def rewards(dr, tg):
        return np.exp(np_log_softmax(tg)) > np.exp(np_log_softmax(dr))

    changed_d, changed_t = draft.copy(), target.copy()
    for b, t in [(0, 2), (1, 0)]:
        changed_d[b, t] = changed_t[b, t] = 200.0 * np.eye(13)[b + t]
    assert rewards(draft, target).sum() != rewards(changed_d, changed_t).sum()
    assert loss(changed_d, changed_t) == pytest.approx(loss(draft, target), rel=1e-6)
    # Control: the same kind of change at a trained position does move the loss.
    control_d, control_t = draft.copy(), target.copy()
    control_d[0, 1] = control_t[0, 1] = 200.0 * np.eye(13)[0]
    assert abs(loss(control_d, control_t) - loss(draft, target)) > 1e-3


# ------------------------------------------------------------------------------ smooth L1


@pytest.mark.parametrize("beta", [1.0, 0.5, 2.0, 0.0])
def test_smooth_l1_matches_numpy(beta):
    rng = np.random.default_rng(13)
    pred = rng.normal(size=(B, T, 16)).astype(np.float32) * 2.0
    target = rng.normal(size=(B, T, 16)).astype(np.float32)
    got = jax.jit(smooth_l1, static_argnames="beta")(jnp.asarray(pred), jnp.asarray(target), beta=beta)
    assert got.shape == (B, T)
    np.testing.assert_allclose(np.asarray(got), np_smooth_l1(pred, target, beta), rtol=1e-6, atol=1e-7)


def test_smooth_l1_both_regions_default_beta():
    pred = jnp.asarray([[[0.5, -0.25, 3.0, -2.0]]], jnp.float32)
    zero = jnp.zeros_like(pred)
    # 0.5 * 0.25 = 0.125, 0.5 * 0.0625 = 0.03125, 3 - 0.5 = 2.5, 2 - 0.5 = 1.5
    assert float(jax.jit(smooth_l1)(pred, zero)[0, 0]) == pytest.approx((0.125 + 0.03125 + 2.5 + 1.5) / 4, rel=1e-7)
    with pytest.raises(ValueError, match="beta"):
        smooth_l1(pred, zero, beta=-1.0)


@pytest.mark.parametrize("beta", [1.0, 0.0])
def test_smooth_l1_check_grads(beta):
    with jax.enable_x64(True):
        rng = np.random.default_rng(14)
        pred = jnp.asarray(rng.normal(size=(B, T, 8)) * 2.0)
        target = jnp.asarray(rng.normal(size=(B, T, 8)))
        check_grads(jax.jit(lambda x: smooth_l1(x, target, beta=beta)), (pred,), order=1, modes=("rev",))


# ------------------------------------------------------------------------------ masked mean


def test_masked_mean():
    rng = np.random.default_rng(15)
    values = rng.normal(size=(B, T)).astype(np.float32)
    mask = trained_mask()
    want = (values * mask).sum() / (mask.sum() + 1e-5)
    got = masked_mean(jnp.asarray(values), jnp.asarray(mask))
    assert got.shape == () and float(got) == pytest.approx(want, rel=1e-6)
    assert float(got) != pytest.approx(values[mask > 0].mean(), rel=1e-7, abs=0)  # the 1e-5 is there
    changed = values.copy()
    changed[mask == 0] = [1e6, np.nan]
    assert float(masked_mean(jnp.asarray(changed), jnp.asarray(mask))) == float(got)
    assert float(masked_mean(jnp.asarray(values), jnp.asarray(mask > 0))) == float(got)  # bool mask
    assert float(masked_mean(jnp.asarray(values), jnp.zeros((B, T)))) == 0.0


# ------------------------------------------------------------------------------ draft_loss

VOCAB, DIM = 13, 8


def features(seed=16):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, T, DIM)).astype(np.float32) * 1.5,
            rng.normal(size=(B, T, DIM)).astype(np.float32))


@jax.jit
def all_draft_losses(pred, tfeat, draft, target, mask, feature_weight, token_weight):
    """value_and_grad of draft_loss w.r.t. its four arrays, for every registry name; one jit
    (weights traced) serves every test that uses [B, T, VOCAB] logits and [B, T, DIM] features."""
    out = {}
    for name in NAMES:
        def objective(pred, tfeat, draft, target, name=name):
            return draft_loss(pred, tfeat, draft, target, mask, token_loss=name,
                              feature_weight=feature_weight, token_weight=token_weight)

        out[name] = jax.value_and_grad(objective, argnums=(0, 1, 2, 3), has_aux=True)(pred, tfeat, draft, target)
    return out


def run_draft_loss(name, pred, tfeat, draft, target, mask, feature_weight=1.0, token_weight=0.1):
    args = [jnp.asarray(x) for x in (pred, tfeat, draft, target, mask)]
    return all_draft_losses(*args, feature_weight, token_weight)[name]


def test_registry_names_match_config():
    from flatspec_jax.config import LossName

    assert set(TOKEN_LOSSES) == set(NAMES) == set(typing.get_args(LossName))


@pytest.mark.parametrize("name", NAMES)
def test_draft_loss_combines_terms(name):
    pred, tfeat = features()
    draft, target = logits_pair(VOCAB, seed=17)
    mask = trained_mask()
    (loss, terms), _ = run_draft_loss(name, pred, tfeat, draft, target, mask, 0.7, 0.3)
    assert isinstance(terms, LossTerms)
    n = mask.sum() + 1e-5
    want_feature = (np_smooth_l1(pred, tfeat) * mask).sum() / n
    per_position = np_tvdpp(draft, target) if name == "tvdpp" else np_terms(draft, target)[name]
    want_token = (per_position * mask).sum() / n
    assert float(terms.feature) == pytest.approx(want_feature, rel=1e-5)
    assert float(terms.token) == pytest.approx(want_token, rel=1e-4, abs=1e-6)
    assert float(terms.acceptance) == pytest.approx((np_terms(draft, target)["alpha"] * mask).sum() / n, rel=1e-5)
    assert float(loss) == pytest.approx(0.7 * float(terms.feature) + 0.3 * float(terms.token), rel=1e-6)


def test_draft_loss_eagle_reference_numbers():
    """EAGLE: vloss + 0.1 * ploss, both summed over trained entries and divided by (n + 1e-5)."""
    pred, tfeat = features(seed=18)
    draft, target = logits_pair(VOCAB, seed=18)
    mask = trained_mask()
    (loss, _), _ = run_draft_loss("eagle", pred, tfeat, draft, target, mask, 1.0, 0.1)
    n = mask.sum() + 1e-5
    p, log_q = np.exp(np_log_softmax(target)), np_log_softmax(draft)
    ploss = -(mask[..., None] * p * log_q).sum() / n
    vloss = (mask[..., None] * np_smooth_l1(pred, tfeat)[..., None]).sum() / n
    assert float(loss) == pytest.approx(vloss + 0.1 * ploss, rel=1e-5)


def test_draft_loss_top_k_metrics():
    target = np.zeros((B, T, VOCAB), np.float32)
    draft = np.zeros((B, T, VOCAB), np.float32)
    tops = [[0, 1, 2], [3, 4, 5]]  # argmax p per position
    for b in range(B):
        for t in range(T):
            target[b, t, tops[b][t]] = 5.0
    # The draft's ranking (best first) of the first six tokens at each position.
    orders = {(0, 0): [0, 1, 2, 3, 4, 5],   # rank 1: top-1 and top-3 hit
              (0, 1): [2, 1, 0, 3, 4, 5],   # rank 2: top-3 hit
              (0, 2): [0, 1, 2, 3, 4, 5],   # rank 3: top-3 hit (boundary)
              (1, 0): [0, 1, 2, 3, 4, 5],   # rank 4: miss
              (1, 1): [4, 0, 1, 2, 3, 5],   # rank 1, but the position is untrained
              (1, 2): [5, 0, 1, 2, 3, 4]}   # rank 1: top-1 and top-3 hit
    for (b, t), order in orders.items():
        draft[b, t, order] = np.arange(6, 0, -1, dtype=np.float32)
    mask = np.ones((B, T), np.float32)
    mask[1, 1] = 0.0
    zeros = np.zeros((B, T, DIM), np.float32)
    (_, terms), _ = run_draft_loss("eagle", zeros, zeros, draft, target, mask)
    assert float(terms.top1) == pytest.approx(2 / (5 + 1e-5), rel=1e-6)
    assert float(terms.top3) == pytest.approx(4 / (5 + 1e-5), rel=1e-6)
    assert float(terms.feature) == 0.0


def test_draft_loss_unknown_name_lists_valid_names():
    pred, tfeat = features()
    d, t = logits_pair(VOCAB)
    with pytest.raises(ValueError) as info:
        draft_loss(jnp.asarray(pred), jnp.asarray(tfeat), jnp.asarray(d), jnp.asarray(t), jnp.ones((B, T)),
                   token_loss="reverse_kl", feature_weight=1.0, token_weight=0.1)
    message = str(info.value)
    assert "reverse_kl" in message and all(name in message for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_registry_entry_jits_with_finite_gradients(name):
    pred, tfeat = features(seed=19)
    draft, target = logits_pair(VOCAB, seed=19)
    mask = trained_mask()
    (loss, terms), (g_pred, g_tfeat, g_draft, g_target) = run_draft_loss(name, pred, tfeat, draft, target, mask)
    assert np.isfinite(float(loss)) and all(np.isfinite(float(x)) for x in terms)
    g_pred, g_draft = np.asarray(g_pred), np.asarray(g_draft)
    assert np.all(np.isfinite(g_draft)) and np.any(g_draft)
    assert np.all(np.isfinite(g_pred)) and np.any(g_pred)
    # Untrained positions get no gradient; the targets (features and logits) get none at all.
    assert not np.any(g_draft[mask == 0]) and not np.any(g_pred[mask == 0])
    assert not np.any(np.asarray(g_target)) and not np.any(np.asarray(g_tfeat))
    # The registry function under jit gives the token term.
    m = jnp.asarray(mask)
    per_position = jax.jit(TOKEN_LOSSES[name])(jnp.asarray(draft), jnp.asarray(target), m)
    assert per_position.shape == (B, T)
    assert float(masked_mean(per_position, m)) == pytest.approx(float(terms.token), rel=1e-6, abs=1e-7)


def test_bfloat16_inputs_use_float32_math():
    draft, target = logits_pair(VOCAB, seed=20)
    d16, t16 = jnp.asarray(draft, jnp.bfloat16), jnp.asarray(target, jnp.bfloat16)
    got = PUBLIC["eagle"](d16, t16)
    assert got.dtype == jnp.float32
    want = np_terms(np.asarray(d16, np.float32), np.asarray(t16, np.float32))["eagle"]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [*PUBLIC, *(f"registry/{n}" for n in NAMES)])
def test_terms_called_on_their_own_give_the_target_logits_no_gradient(name):
    """The public terms and registry entries stop the target's gradient themselves, not only inside
    draft_loss: a caller differentiating one of them alone must not train the teacher."""
    draft, target = (jnp.asarray(x) for x in logits_pair(VOCAB, seed=23))
    if name.startswith("registry/"):
        term = functools.partial(lambda fn, d, t: fn(d, t, jnp.ones((B, T))), TOKEN_LOSSES[name.split("/")[1]])
    else:
        term = PUBLIC[name]
    g_draft, g_target = sum_grad(term, argnums=(0, 1))(draft, target)
    assert np.any(np.asarray(g_draft)) and not np.any(np.asarray(g_target))


agreement = jax.jit(agreement_terms)


@settings(deadline=None, max_examples=60)
@given(seed=st.integers(0, 2**32 - 1), levels=st.integers(1, 4))
def test_top_k_metric_ties_rank_the_lower_token_id_first(seed, levels):
    """Draft logits drawn from a few values tie often; the target's argmax then counts as a top-1/top-3
    hit exactly where a stable descending sort (ties by token id, as lax.top_k) puts it first/in the first 3."""
    rng = np.random.default_rng(seed)
    draft = rng.integers(0, levels, (B, T, VOCAB)).astype(np.float32)
    target = np.zeros((B, T, VOCAB), np.float32)
    tops = rng.integers(0, VOCAB, (B, T))
    np.put_along_axis(target, tops[..., None], 5.0, axis=-1)
    ranking = np.argsort(-draft, axis=-1, kind="stable")
    rank = np.argmax(ranking == tops[..., None], axis=-1)
    _, top1, top3 = agreement(jnp.asarray(draft), jnp.asarray(target))
    np.testing.assert_array_equal(np.asarray(top1), rank == 0)
    np.testing.assert_array_equal(np.asarray(top3), rank < 3)


def test_a_draft_position_holding_a_nan_hits_nothing():
    """A diverged head's NaN logits compare false with everything, so the target's argmax would rank first."""
    target = np.zeros((1, 3, VOCAB), np.float32)
    target[..., 2] = 5.0
    draft = np.zeros((1, 3, VOCAB), np.float32)
    draft[..., 2] = 1.0  # position 0: a finite hit
    draft[0, 1] = np.nan
    draft[0, 2, 0] = np.nan  # one NaN elsewhere in the row
    _, top1, top3 = agreement(jnp.asarray(draft), jnp.asarray(target))
    np.testing.assert_array_equal(np.asarray(top1), [[1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(top3), [[1.0, 0.0, 0.0]])
