"""The verification law, exactly: rejection sampling with ``verify.residual`` emits the target's p.

No sampling and no model here: the probability of emitting each token is summed over the
verifier's branches in closed form and compared with p, for random p and q over a small
vocabulary. Either may be zero on some tokens (as top-p warping or a reduced draft vocabulary
makes them), and q = p is included. The acceptance rules are written out here as the papers
state them, so these tests check the residual algebra the verifiers share, not the verifiers'
own code: ``test_spec_sampling.py`` checks the decoders' output law statistically, and
``test_spec_blocks.py`` the verifiers on point-mass cases.
  * Chain (Leviathan et al.): a draft x ~ q is accepted with probability min(1, p(x) / q(x));
    the rejection, of probability 1 - sum_w min(p_w, q_w), is followed by a sample from
    norm(residual(p, q)).
  * Tree siblings (EAGLE-2 / SpecInfer recursive rejection): k distinct deterministic sibling
    tokens are tried in order against p', starting from p' = p; sibling x is accepted with
    probability p'(x) / sum(p'), else x's mass is removed, p' = residual(p', sum(p') delta_x),
    and after the last sibling a token is sampled from norm(p').
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from flatspec_jax.decoding import verify

ATOL = 1e-6  # the residual is float32; sums run over <= 8 tokens


@st.composite
def distributions(draw, vocab: int) -> np.ndarray:
    """[vocab] float64 probabilities from random weights, often some exactly zero (as outside a
    top-p nucleus, or outside a reduced draft vocabulary), never all."""
    weights = np.asarray(draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 1.0)), min_size=vocab,
                                       max_size=vocab)))
    if not weights.any():
        weights[draw(st.integers(0, vocab - 1))] = 1.0
    return weights / weights.sum()


@st.composite
def target_and_draft(draw) -> tuple[np.ndarray, np.ndarray]:
    vocab = draw(st.integers(2, 8))
    p = draw(distributions(vocab))
    same = draw(st.booleans()) and draw(st.booleans())  # p == q about a quarter of the time
    return p, (p.copy() if same else draw(distributions(vocab)))


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The project's residual on float32 inputs, back as float64."""
    return np.asarray(verify.residual(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32)), np.float64)


@settings(max_examples=300, deadline=None)
@given(pq=target_and_draft())
def test_chain_rule_emits_the_target_distribution(pq):
    p, q = pq
    accepted = np.where(q > 0, q * np.minimum(1.0, p / np.where(q > 0, q, 1.0)), 0.0)  # x ~ q, then accept
    rejected = 1.0 - np.minimum(p, q).sum()
    left = residual(p, q)
    # The residual holds exactly the rejected mass, so norm(residual) is well defined whenever
    # rejection can happen; with no rejection mass (p == q) it is empty.
    np.testing.assert_allclose(left.sum(), rejected, atol=ATOL)
    emitted = accepted + (rejected * left / left.sum() if left.sum() > ATOL else 0.0)
    np.testing.assert_allclose(emitted, p, atol=ATOL)
    if np.array_equal(p, q):
        assert left.sum() == 0.0 and np.allclose(accepted, p, atol=ATOL)


def reject_sibling(left: np.ndarray, token: int) -> np.ndarray:
    """p' after rejecting ``token``: verify_sampling_tree's own step (``residual`` of p' and
    sum(p') delta_token; inlined there, restated here)."""
    return residual(left, left.sum() * np.eye(len(left))[token])


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_recursive_rejection_over_distinct_siblings_emits_the_target_distribution(data):
    vocab = data.draw(st.integers(2, 8))
    p = data.draw(distributions(vocab))
    siblings = data.draw(st.permutations(range(vocab)))[:data.draw(st.integers(1, vocab))]
    emitted, reach, left = np.zeros(vocab), 1.0, p.copy()  # reach: P(every earlier sibling rejected)
    for token in siblings:
        total = left.sum()
        if total <= ATOL:  # earlier siblings took all the mass: this one is never tried
            break
        accept = left[token] / total
        emitted[token] += reach * accept
        reach *= 1.0 - accept
        left = reject_sibling(left, token)
        assert left[token] == 0.0  # distinct siblings: a rejected token is never emitted later
    if left.sum() > ATOL:  # all siblings rejected: the bonus is drawn from what is left
        emitted += reach * left / left.sum()
    else:  # the siblings covered p's support, and the last of them always accepts
        assert reach < ATOL
    np.testing.assert_allclose(emitted, p, atol=ATOL)
