"""Training losses of an EAGLE draft head: feature regression plus a token-distribution term.

At every draft position the target model's next-token distribution p and the draft's q are

    p = softmax(z_p),   z_p = target_logits   (constant: wrapped in stop_gradient here)
    q = softmax(z_q),   z_q = draft_logits    (the draft's output through the frozen LM head)

and the single-draft acceptance rate of speculative sampling at temperature 1 is

    alpha = sum_v min(p_v, q_v) = 1 - TV(p, q),   TV(p, q) = 1/2 sum_v |p_v - q_v|,

because sum_v |p - q| = sum_v (p + q - 2 min(p, q)) = 2 - 2 alpha.

Per-position token terms (each [B, T]; `TOKEN_LOSSES` holds them under the config's names):

    eagle      soft CE      -sum_v p_v log q_v                       (EAGLE's "ploss")
    kl         KL(p || q)    sum_v p_v (log p_v - log q_v)  = soft CE - H(p)
    tvd        TV(p, q)      1/2 sum_v |p_v - q_v|          = 1 - alpha
    tvdpp      TVD++         mean_v( -sg[r~_v] log q_v ), r~ the standardised 1[p_v > q_v]
    lk         L_alpha      -log max(alpha, 1e-5)           = -log(1 - TV)
    lk_hybrid  L_lambda      lambda KL(p || q) + (1 - lambda)(1 - alpha),
                             lambda = exp(-eta sg[alpha]), eta = 3

The feature term is PyTorch's SmoothL1Loss (beta = 1) averaged over the hidden dimension, and
each per-position value is reduced with EAGLE's masked mean sum(x * mask) / (sum(mask) + 1e-5).
The total is

    loss = feature_weight * feature + token_weight * token,

with EAGLE's reference recipe at feature_weight = 1.0, token_weight = 0.1, token term soft CE
(SafeAILab/EAGLE, eagle/train/main.py). `draft_loss` defines it on logits; the train step
computes the same from hidden states with :mod:`flatspec_jax.train.head_loss`, which never
materialises them.

Precision: logits and features are promoted to at least float32 before any arithmetic, so
bfloat16 inputs get float32 softmaxes while float64 inputs (gradient checks under x64) stay
float64. Both distributions come from one log_softmax per input; the probabilities are
exp(log-probabilities), which XLA fuses into the vocabulary reductions rather than storing.

Shape legend: B rows, T draft positions, V vocabulary size, D hidden size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

# EAGLE divides by (number of trained positions + 1e-5), not by max(n, 1): replicated exactly
# so that losses match the reference's numbers (they differ from a plain mean by a factor
# n / (n + 1e-5), i.e. ~1e-5 relative for a single position).
MASK_EPS = 1e-5
# Floor of alpha inside -log(alpha) (as in the LK reference implementation): keeps L_alpha and
# its gradient finite when the two distributions barely overlap.
ALPHA_FLOOR = 1e-5
# Added to the reward's standard deviation in TVD++ (as in the public implementation): when
# every reward is equal the standardised reward is 0 instead of 0 / 0.
TVDPP_EPS = 1e-5


def _compute_dtype(x: Array) -> jnp.dtype:
    """float32 for half-precision (and float32) inputs, float64 for float64 ones."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _log_probs(logits: Array) -> Array:
    return jax.nn.log_softmax(logits.astype(_compute_dtype(logits)), axis=-1)


def _target_log_probs(target_logits: Array) -> Array:
    # The target is a fixed teacher: no gradient may reach its logits (and through them the
    # target model or the regression target), whichever loss is used.
    return _log_probs(jax.lax.stop_gradient(target_logits))


def masked_mean(values: Array, mask: Array) -> Array:
    """EAGLE's masked average: sum(values * mask) / (sum(mask) + 1e-5).

    Args:
      values: [B, T] per-position values.
      mask: [B, T], 1 (or True) where the position is trained, 0 elsewhere.

    Returns:
      [] scalar, float32 or wider. 0 when the mask is empty.

    Positions with mask 0 are excluded with `where`, not only multiplied by 0, so a NaN or inf
    at a padded position (e.g. an all -inf row of logits) can reach neither the value nor the
    gradient.
    """
    dtype = jnp.promote_types(values.dtype, jnp.float32)
    mask = mask.astype(dtype)
    total = jnp.sum(jnp.where(mask != 0, values.astype(dtype) * mask, 0.0))
    return total / (jnp.sum(mask) + MASK_EPS)


# ----------------------------------------------------------------------------------------------
# Token terms on log-probabilities: log_p [B, T, V] (already stop-gradient), log_q [B, T, V].
# The public functions below and `draft_loss` share them, so each input's log_softmax is
# computed once per call.


def _soft_ce(log_p: Array, log_q: Array) -> Array:
    p = jnp.exp(log_p)
    # p = 0 contributes 0 even where log q = -inf (a masked-out vocabulary entry).
    return -jnp.sum(jnp.where(p > 0, p * log_q, 0.0), axis=-1)


def _forward_kl(log_p: Array, log_q: Array) -> Array:
    p = jnp.exp(log_p)
    # xlogy convention 0 log 0 = 0: a token with p = 0 (target logit -inf, log p = -inf) would
    # otherwise give 0 * (-inf) = NaN in the value and in the gradient w.r.t. log q.
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def _total_variation(log_p: Array, log_q: Array) -> Array:
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=-1)


def _acceptance(log_p: Array, log_q: Array) -> Array:
    return jnp.sum(jnp.minimum(jnp.exp(log_p), jnp.exp(log_q)), axis=-1)


def _lk_acceptance(log_p: Array, log_q: Array) -> Array:
    return -jnp.log(jnp.maximum(_acceptance(log_p, log_q), ALPHA_FLOOR))


def _lk_hybrid(log_p: Array, log_q: Array, eta: float) -> Array:
    alpha = _acceptance(log_p, log_q)
    # The weight follows the current overlap but is not itself optimised: stop-gradient.
    lam = jnp.exp(-eta * jax.lax.stop_gradient(alpha))
    return lam * _forward_kl(log_p, log_q) + (1.0 - lam) * (1.0 - alpha)


def _tvd_plus_plus(
    log_p: Array,
    log_q: Array,
    mask: Array | None,
    weighting: Literal["uniform", "q"],
    normalize: Literal["vocab", "batch"],
) -> Array:
    if weighting not in ("uniform", "q"):
        raise ValueError(f"weighting must be 'uniform' or 'q', got {weighting!r}")
    if normalize not in ("vocab", "batch"):
        raise ValueError(f"normalize must be 'vocab' or 'batch', got {normalize!r}")
    vocab = log_q.shape[-1]
    dtype = log_q.dtype
    # The reward is a comparison, so it has no derivative anyway; stop_gradient makes the
    # "policy-gradient surrogate" reading explicit and guards against a smooth reward later.
    q = jax.lax.stop_gradient(jnp.exp(log_q))
    reward = jax.lax.stop_gradient((jnp.exp(log_p) > q).astype(dtype))
    if normalize == "vocab":
        mean = jnp.mean(reward, axis=-1, keepdims=True)
        # Bessel-corrected like torch.std; max(., 1) only matters for the degenerate V = 1.
        var = jnp.sum((reward - mean) ** 2, axis=-1, keepdims=True) / max(vocab - 1, 1)
    else:
        if mask is None:
            raise ValueError("normalize='batch' needs the position mask")
        # Statistics over every trained (position, token) pair; untrained positions are
        # excluded so padding cannot shift the baseline or the scale.
        m = (mask != 0).astype(dtype)[..., None]
        count = jnp.sum(m) * vocab
        mean = jnp.sum(m * reward) / jnp.maximum(count, 1.0)
        var = jnp.sum(m * (reward - mean) ** 2) / jnp.maximum(count - 1.0, 1.0)
    advantage = jax.lax.stop_gradient((reward - mean) / (jnp.sqrt(var) + TVDPP_EPS))
    if weighting == "uniform":
        return -jnp.mean(advantage * log_q, axis=-1)
    return -jnp.sum(q * advantage * log_q, axis=-1)


# ----------------------------------------------------------------------------------------------
# Public per-position token terms: (draft_logits [B, T, V], target_logits [B, T, V]) -> [B, T].


def soft_cross_entropy(draft_logits: Array, target_logits: Array) -> Array:
    """-sum_v p_v log q_v per position: EAGLE's "ploss" before the masked mean. [B, T]."""
    return _soft_ce(_target_log_probs(target_logits), _log_probs(draft_logits))


def forward_kl(draft_logits: Array, target_logits: Array) -> Array:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) per position, with 0 log 0 = 0. [B, T].

    Equal to soft_cross_entropy - H(p); the two have the same gradient w.r.t. the draft.
    """
    return _forward_kl(_target_log_probs(target_logits), _log_probs(draft_logits))


def total_variation(draft_logits: Array, target_logits: Array) -> Array:
    """TV(p, q) = 1/2 sum_v |p_v - q_v| = 1 - alpha per position. [B, T].

    1 - TV is the probability that speculative sampling at temperature 1 accepts a single
    drafted token, so minimising TV maximises the acceptance rate directly. Its gradient
    w.r.t. the draft logits z is 1/2 sum_v sign(q_v - p_v) dq_v/dz (0 on exact ties).
    """
    return _total_variation(_target_log_probs(target_logits), _log_probs(draft_logits))


def acceptance_rate(draft_logits: Array, target_logits: Array) -> Array:
    """alpha = sum_v min(p_v, q_v) per position, in [0, 1]. [B, T]."""
    return _acceptance(_target_log_probs(target_logits), _log_probs(draft_logits))


def tvd_plus_plus(
    draft_logits: Array,
    target_logits: Array,
    mask: Array | None = None,
    *,
    weighting: Literal["uniform", "q"] = "q",
    normalize: Literal["vocab", "batch"] = "vocab",
) -> Array:
    """TVD++ (Goel et al., arXiv 2403.00858): TV's policy gradient with a standardised reward.

    Why TV is a policy gradient. With d|a - b|/db = sign(b - a) and the score-function
    identity grad q(x) = q(x) grad log q(x),

        grad TV = 1/2 sum_x sign(q(x) - p(x)) grad q(x) = -E_{x~q}[ 1/2 sign(p(x) - q(x)) grad log q(x) ],

    and since E_{x~q}[grad log q(x)] = grad sum_x q(x) = 0 any constant may be added to the
    reward; adding 1/2 gives, away from ties p(x) = q(x),

        grad TV = -E_{x~q}[ 1{p(x) > q(x)} grad log q(x) ].

    TVD++ replaces the reward r = 1{p > q} by the standardised advantage
    r~ = (r - mean r) / (std r + 1e-5) (std Bessel-corrected) and minimises the surrogate

        weighting="q":        l = -sum_v sg[q_v] sg[r~_v] log q_v      (exact E_{x~q}; default)
        weighting="uniform":  l = mean_v( -sg[r~_v] log q_v )

    whose gradient w.r.t. the draft logits z is, using sum_v r~_v = 0 for the per-position
    statistics,

        uniform:  -(r~ - q sum_v r~_v) / V = -r~ / V    (every under-covered token pushed up
                                                         equally, over-covered ones down)
        q:        -(q r~ - q sum_v q_v r~_v) = grad TV / (std r + 1e-5)

    (with exact expectation the baseline is inert and standardisation only rescales the TV
    gradient per position).

    Provenance. Only the paper's abstract could be read ("variance reduction techniques inspired
    from the policy gradient method"); its equations, and hence their numbers, could not be
    checked. Everything above beyond the abstract is a reconstruction. The default weights the
    reward by q, the exact expectation over draft tokens that makes the surrogate TV's policy
    gradient (its gradient is TV's, rescaled per position); statistics per position over the
    vocabulary, Bessel std and eps 1e-5 on the std follow a public EAGLE-derived implementation
    (`calc_tvdpp_loss`, third-party training utilities, not the authors' code), whose uniform
    weights are kept as an option: that gradient, -r~ / V, is no policy gradient over draft
    tokens (cosine ~0.06 with TV's at V = 49,152) and trained the worst draft of the token
    losses compared (BENCHMARKS.md).

    Args:
      draft_logits: [B, T, V].
      target_logits: [B, T, V]; never receives gradient.
      mask: [B, T], 1 where the position is trained. Only read by normalize="batch".
      weighting: "uniform" (mean over V) or "q" (weights sg[q_v], summed over V).
      normalize: "vocab" (mean/std per position over V) or "batch" (mean/std over all
        (position, token) pairs of positions with mask != 0).

    Returns:
      [B, T] per-position surrogate values. Their value is not a distance (it can be negative);
      only the gradient is meaningful. If every reward of a position (or of the batch) is
      equal, e.g. p = q, r~ = 0 there and so are the loss and its gradient.

    At a near-tie p_v ~ q_v the indicator is decided by float rounding (as in the reference
    implementation), and the target and draft softmaxes may round differently even for
    identical logits (e.g. under jit with autodiff): p = q gives all-zero rewards only where
    the rounding agrees, as it does for exactly representable (e.g. saturated one-hot) p.
    """
    return _tvd_plus_plus(_target_log_probs(target_logits), _log_probs(draft_logits), mask, weighting, normalize)


def lk_acceptance(draft_logits: Array, target_logits: Array) -> Array:
    """L_alpha of the LK losses (Samarin et al., arXiv 2602.23881): -log max(alpha, 1e-5). [B, T].

    Its gradient is grad(1 - alpha) / alpha: TV's direction, amplified where the overlap is
    small (where TV's own gradient is weak). For a one-hot p it is the hard cross-entropy.
    """
    return _lk_acceptance(_target_log_probs(target_logits), _log_probs(draft_logits))


def lk_hybrid(draft_logits: Array, target_logits: Array, *, eta: float = 3.0) -> Array:
    """L_lambda of the LK losses: lambda KL(p || q) + (1 - lambda)(1 - alpha). [B, T].

    lambda = exp(-eta sg[alpha]) per position, without gradient: little overlap (early
    training) gives lambda ~ 1 and KL's strong gradient, high overlap gives lambda ~ exp(-eta)
    and mostly the acceptance objective. eta = 3 is the setting of the reference implementation
    (vllm-project/speculators); whether the paper uses a per-position or a batch alpha in lambda
    was not verified.
    """
    return _lk_hybrid(_target_log_probs(target_logits), _log_probs(draft_logits), eta)


def smooth_l1(pred: Array, target: Array, beta: float = 1.0) -> Array:
    """PyTorch's SmoothL1Loss (reduction "none") averaged over the hidden dimension. [B, T].

    Elementwise, with d = pred - target:  0.5 d^2 / beta if |d| < beta, else |d| - 0.5 beta;
    beta = 0 is the plain L1 loss (as in PyTorch). EAGLE's "vloss" before the masked mean.

    Args:
      pred: [B, T, D].
      target: [B, T, D]. Differentiated like pred; callers stop its gradient if it is data.
      beta: a Python float >= 0 (static: it selects the formula).
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    dtype = jnp.promote_types(jnp.promote_types(pred.dtype, target.dtype), jnp.float32)
    diff = pred.astype(dtype) - target.astype(dtype)
    abs_diff = jnp.abs(diff)
    if beta == 0:
        # Not the formula below with beta = 0: its untaken branch d^2 / 0 would put 0 * inf = NaN
        # into the gradient.
        elementwise = abs_diff
    else:
        elementwise = jnp.where(abs_diff < beta, 0.5 * diff * diff / beta, abs_diff - 0.5 * beta)
    return jnp.mean(elementwise, axis=-1)


# ----------------------------------------------------------------------------------------------
# Registry and the full draft loss.

TokenLoss = Callable[[Array, Array, Array], Array]
"""(draft_logits [B, T, V], target_logits [B, T, V], mask [B, T]) -> [B, T] per-position values."""

# Internal form on log-probabilities (log_p, log_q, mask), so that `draft_loss` can reuse one
# log_softmax per input for the token term and the metrics. Defaults of the options
# (TVD++ q/vocab, LK hybrid eta = 3) are the ones the config names stand for.
_TOKEN_TERMS: dict[str, Callable[[Array, Array, Array], Array]] = {
    "eagle": lambda log_p, log_q, mask: _soft_ce(log_p, log_q),
    "kl": lambda log_p, log_q, mask: _forward_kl(log_p, log_q),
    "tvd": lambda log_p, log_q, mask: _total_variation(log_p, log_q),
    "tvdpp": lambda log_p, log_q, mask: _tvd_plus_plus(log_p, log_q, mask, "q", "vocab"),
    "lk": lambda log_p, log_q, mask: _lk_acceptance(log_p, log_q),
    "lk_hybrid": lambda log_p, log_q, mask: _lk_hybrid(log_p, log_q, 3.0),
}


def _on_logits(term: Callable[[Array, Array, Array], Array]) -> TokenLoss:
    def loss(draft_logits: Array, target_logits: Array, mask: Array) -> Array:
        return term(_target_log_probs(target_logits), _log_probs(draft_logits), mask)

    return loss


TOKEN_LOSSES: dict[str, TokenLoss] = {name: _on_logits(term) for name, term in _TOKEN_TERMS.items()}
"""Token terms by config name (`train.loss`): eagle, kl, tvd, tvdpp, lk, lk_hybrid."""


class LossTerms(NamedTuple):
    """The parts of `draft_loss`, each a masked mean over trained positions ([] scalars).

    A NamedTuple, hence a pytree: it can be returned as `has_aux` output of `jax.value_and_grad`
    and averaged over micro-batches with `jax.tree.map`.

    Attributes:
      feature: SmoothL1 feature regression (EAGLE's vloss).
      token: the selected token term (EAGLE's ploss for "eagle").
      acceptance: alpha = sum_v min(p_v, q_v), the expected single-token acceptance rate at
        temperature 1 (a metric: no gradient).
      top1: fraction of positions where argmax q == argmax p.
      top3: fraction of positions where argmax p is among the 3 largest draft logits.
    """

    feature: Array
    token: Array
    acceptance: Array
    top1: Array
    top3: Array


def check_token_loss(token_loss: str) -> None:
    """Raises ValueError naming the valid token terms if ``token_loss`` is not one of them."""
    if token_loss not in _TOKEN_TERMS:
        raise ValueError(f"unknown token loss {token_loss!r}; valid names: {', '.join(_TOKEN_TERMS)}")


def token_term(draft_logits: Array, target_logits: Array, mask: Array, token_loss: str) -> Array:
    """Per-position token term [..., T] of ``token_loss`` before the masked mean.

    Only it carries gradient (w.r.t. ``draft_logits``); the target logits must already be
    constant. Shared by `draft_loss` and the chunked loss of :mod:`flatspec_jax.train.head_loss`,
    so both compute the same numbers.
    """
    return _TOKEN_TERMS[token_loss](_log_probs(target_logits), _log_probs(draft_logits), mask)


def agreement_terms(draft_logits: Array, target_logits: Array) -> tuple[Array, Array, Array]:
    """Per-position (acceptance, top-1 hit, top-3 hit), each [..., T] float32 metrics without gradient.

    Top-1/top-3 compare on the raw logits: argmax is invariant to the softmax shift, and the raw
    values avoid ties that rounding in z - logsumexp(z) could create. The target's argmax's rank
    among the draft logits (ties ordered by token id, as top_k orders them) takes one fused pass
    over the vocabulary; a top_k over V is several times slower on CPU. A draft position holding a NaN
    (a diverged head) hits nothing: every comparison with NaN is false, so it would rank first.
    """
    draft = jax.lax.stop_gradient(draft_logits)
    target = jax.lax.stop_gradient(target_logits)
    acceptance = _acceptance(_log_probs(target), _log_probs(draft))
    target_top = jnp.argmax(target, axis=-1)
    picked = jnp.take_along_axis(draft, target_top[..., None], axis=-1)
    ids = jnp.arange(draft.shape[-1])
    ahead = (draft > picked) | ((draft == picked) & (ids < target_top[..., None]))
    rank = jnp.where(jnp.any(jnp.isnan(draft), axis=-1), draft.shape[-1], jnp.sum(ahead, axis=-1))
    return acceptance, (rank == 0).astype(jnp.float32), (rank < 3).astype(jnp.float32)


def draft_loss(
    pred_features: Array,
    target_features: Array,
    draft_logits: Array,
    target_logits: Array,
    mask: Array,
    *,
    token_loss: str,
    feature_weight: float,
    token_weight: float,
) -> tuple[Array, LossTerms]:
    """feature_weight * masked_mean(smooth_l1) + token_weight * masked_mean(token term).

    EAGLE's reference recipe is token_loss="eagle", feature_weight=1.0, token_weight=0.1.

    Args:
      pred_features: [B, T, D] draft output features.
      target_features: [B, T, D] target features f_{t+1} (data: no gradient reaches them).
      draft_logits: [B, T, V] the draft features through the frozen LM head.
      target_logits: [B, T, V] the target's next-token logits (no gradient).
      mask: [B, T], 1 where the position is trained.
      token_loss: a key of `TOKEN_LOSSES`.
      feature_weight, token_weight: the two weights.

    Returns:
      (loss [], LossTerms). Ties in the top-1/top-3 metrics resolve to the lowest token id.

    Raises:
      ValueError: unknown token_loss.
    """
    check_token_loss(token_loss)
    target_logits = jax.lax.stop_gradient(target_logits)
    per_position = (token_term(draft_logits, target_logits, mask, token_loss),
                    *agreement_terms(draft_logits, target_logits))
    feature = masked_mean(smooth_l1(pred_features, jax.lax.stop_gradient(target_features)), mask)
    token, acceptance, top1, top3 = (masked_mean(values, mask) for values in per_position)
    loss = feature_weight * feature + token_weight * token
    return loss, LossTerms(feature=feature, token=token, acceptance=acceptance, top1=top1, top3=top3)
