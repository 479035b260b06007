"""Tests for flatspec_jax.flatness against an independent float64 NumPy implementation.

The reference follows the definitions literally (softmax, then the cosine similarity with the
uniform vector, -sum p log p, max p, -log p[target]); the library instead works from
log-sum-exps and online chunk merges, so agreement checks the algebra as well as the code.

Tolerances: flatness and top1_prob are >= 1/V, so they are compared purely relatively. The
entropy and nll are compared relatively plus 1e-6 nats absolutely: for a confident prediction
they are log(1 + eps) with eps below float32's resolution around 1, which no float32 code
can resolve relatively.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flatspec_jax.flatness import (
    TokenStats,
    sample_stats,
    segment_stats,
    token_stats_from_hidden,
    token_stats_from_logits,
    token_stats_vocab_parallel,
)

RTOL = 1e-5
NATS_ATOL = 1e-6
FIELDS = ("flatness", "entropy", "top1_prob", "nll")
SETTINGS = settings(deadline=None, max_examples=50)
# Property tests draw shapes from short lists and call a jitted function, so each shape
# compiles once instead of every eager op recompiling for every new shape.
VOCABS = (2, 3, 17, 64)
LEADS = ((1,), (2, 3))
stats_of_logits = jax.jit(token_stats_from_logits)
stats_of_hidden = jax.jit(token_stats_from_hidden, static_argnames="chunk_size")
means_of_samples = jax.jit(sample_stats)
means_of_segments = jax.jit(segment_stats, static_argnames="num_segments")


def naive_stats(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """float64 reference for logits [..., V], targets [...]."""
    z = np.asarray(logits, np.float64) / temperature
    vocab = z.shape[-1]
    shifted = z - z.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    p = np.exp(log_p)
    uniform = np.full(vocab, 1.0 / vocab)
    cosine = (p @ uniform) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(uniform))
    return {
        "flatness": cosine,
        "entropy": -(p * np.where(p > 0, log_p, 0.0)).sum(-1),
        "top1_prob": p.max(-1),
        "nll": -np.take_along_axis(log_p, np.asarray(targets)[..., None], -1)[..., 0],
    }


def assert_stats_close(got: TokenStats, want: dict[str, np.ndarray] | TokenStats, rtol: float = RTOL,
                       nats_atol: float = NATS_ATOL) -> None:
    want = want._asdict() if isinstance(want, TokenStats) else want
    for name in FIELDS:
        value = getattr(got, name)
        assert value.dtype == jnp.float32, name
        atol = nats_atol if name in ("entropy", "nll") else 0.0
        np.testing.assert_allclose(np.asarray(value), np.asarray(want[name]), rtol=rtol, atol=atol, err_msg=name)


@st.composite
def logits_cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """float32 logits [..., V] of any scale and sign, and targets [...] (sometimes the argmax)."""
    lead = draw(st.sampled_from(LEADS))
    vocab = draw(st.sampled_from(VOCABS))
    scale = draw(st.sampled_from([1e-3, 0.3, 1.0, 5.0, 20.0, 50.0]))
    offset = draw(st.floats(-100.0, 100.0))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    logits = (rng.standard_normal(lead + (vocab,)) * scale + offset).astype(np.float32)
    targets = logits.argmax(-1) if draw(st.booleans()) else rng.integers(0, vocab, lead)
    return logits, targets


@SETTINGS
@given(case=logits_cases(), temperature=st.sampled_from([0.5, 0.7, 1.0, 1.3, 2.0]))
def test_logits_match_naive_reference(case, temperature):
    logits, targets = case
    got = stats_of_logits(jnp.asarray(logits), jnp.asarray(targets), temperature)
    assert_stats_close(got, naive_stats(logits, targets, temperature))


@SETTINGS
@given(case=logits_cases())
def test_flatness_lies_in_bounds(case):
    logits, targets = case
    flat = np.asarray(stats_of_logits(jnp.asarray(logits), jnp.asarray(targets)).flatness)
    low = logits.shape[-1] ** -0.5
    assert np.all(flat >= low - 1e-6) and np.all(flat <= 1 + 1e-6), (flat, low)


@pytest.mark.parametrize("vocab", [2, 7, 64, 1000])
@pytest.mark.parametrize("value", [-1e4, 0.0, 3.7, 1e4])
def test_constant_logits_are_exactly_flat(vocab, value):
    logits = jnp.full((3, vocab), value, jnp.float32)
    stats = stats_of_logits(logits, jnp.zeros(3, jnp.int32))
    np.testing.assert_allclose(stats.flatness, 1.0, atol=1e-6)
    np.testing.assert_allclose(stats.entropy, np.log(vocab), rtol=RTOL)
    np.testing.assert_allclose(stats.top1_prob, 1.0 / vocab, rtol=RTOL)
    np.testing.assert_allclose(stats.nll, np.log(vocab), rtol=RTOL)


@SETTINGS
@given(
    vocab=st.sampled_from(VOCABS),
    position=st.integers(0, 63),
    delta=st.floats(1.0, 30.0),
    sign=st.sampled_from([-1.0, 1.0]),
    base=st.floats(-100.0, 100.0),
)
def test_nonconstant_logits_are_not_flat(vocab, position, delta, sign, base):
    # The least flat-looking non-constant case: all logits equal but one, off by >= 1.
    logits = np.full((1, vocab), base, np.float32)
    logits[0, position % vocab] += sign * delta
    flat = stats_of_logits(jnp.asarray(logits), jnp.zeros(1, jnp.int32)).flatness
    assert float(flat[0]) < 1 - 1e-4


@pytest.mark.parametrize("vocab", [2, 10, 1000])
def test_one_hot_like_logits_reach_the_lower_bound(vocab):
    logits = np.zeros((1, vocab), np.float32)
    logits[0, vocab // 2] = 100.0
    stats = stats_of_logits(jnp.asarray(logits), jnp.asarray([vocab // 2]))
    np.testing.assert_allclose(stats.flatness, vocab**-0.5, rtol=RTOL)
    np.testing.assert_allclose(stats.top1_prob, 1.0, rtol=RTOL)
    np.testing.assert_allclose(stats.entropy, 0.0, atol=NATS_ATOL)
    np.testing.assert_allclose(stats.nll, 0.0, atol=NATS_ATOL)


@SETTINGS
@given(case=logits_cases(), shift=st.integers(-1000, 1000))
def test_statistics_ignore_a_constant_shift(case, shift):
    logits, targets = case
    # On a grid of 1/64 (|z| < 2^11), z + shift is exact in float32: only the code can differ.
    logits = np.clip(np.round(logits * 64) / 64, -500, 500).astype(np.float32)
    plain = stats_of_logits(jnp.asarray(logits), jnp.asarray(targets))
    shifted = stats_of_logits(jnp.asarray(logits + np.float32(shift)), jnp.asarray(targets))
    assert_stats_close(shifted, plain)
    assert_stats_close(plain, naive_stats(logits, targets))


def test_temperature_divides_the_logits():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((4, 33)) * 8).astype(np.float32)
    targets = rng.integers(0, 33, 4)
    hot = stats_of_logits(jnp.asarray(logits), jnp.asarray(targets), temperature=2.0)
    halved = stats_of_logits(jnp.asarray(logits / 2), jnp.asarray(targets))
    assert_stats_close(hot, halved)
    # The nll, too, is of the temperature-scaled distribution, not of the raw logits.
    assert not np.allclose(hot.nll, stats_of_logits(jnp.asarray(logits), jnp.asarray(targets)).nll)


def test_masked_minus_inf_logits_count_as_zero_probability():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((3, 16)) * 4).astype(np.float32)
    logits[:, 10:] = -np.inf
    targets = np.array([0, 3, 9])
    assert_stats_close(stats_of_logits(jnp.asarray(logits), jnp.asarray(targets)),
                       naive_stats(logits, targets))


def grid_matmul_inputs(n: int, vocab: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """hidden [n, dim], lm_head [vocab, dim] on a 1/8 grid: every logit is exact in float32,
    so fused and unfused logits agree bit for bit and only the chunking is under test."""
    rng = np.random.default_rng(seed)
    hidden = rng.integers(-16, 17, (n, dim)) / 8
    lm_head = rng.integers(-16, 17, (vocab, dim)) / 8
    return hidden.astype(np.float32), lm_head.astype(np.float32)


@st.composite
def chunked_cases(draw: st.DrawFn) -> dict:
    """Non-grid float32 hidden [..., D] of any scale and offset, with a one-hot lm_head [V, D]: each logit is a
    copy of one hidden entry, exact in float32 whatever the order or blocking of the matmul's sums, so the
    chunked and direct statistics see the same logits and only the chunking is under test. Sometimes V > D
    columns are shared (tied logits, also across chunks). Row 0 is constant: all its logits are equal.
    Targets favour chunk edges, the last token and the argmax."""
    lead = draw(st.sampled_from(LEADS))
    vocab = draw(st.integers(2, 300))
    chunk_size = draw(st.integers(1, vocab + 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-3, 0.3, 1.0, 5.0, 20.0, 50.0]))
    offset = draw(st.floats(-100.0, 100.0))
    tied = draw(st.booleans())
    dim = max(1, vocab // 3) if tied else vocab
    columns = rng.integers(0, dim, vocab) if tied else rng.permutation(vocab)
    hidden = (rng.standard_normal(lead + (dim,)) * scale + offset).astype(np.float32)
    hidden.reshape(-1, dim)[0] = np.float32(offset + scale * rng.standard_normal())
    lm_head = np.eye(dim, dtype=np.float32)[columns]
    logits = hidden[..., columns]
    edges = [0, vocab - 1, min(chunk_size, vocab) - 1, min(chunk_size, vocab - 1)]
    targets = np.where(rng.random(lead) < 0.5, rng.choice(edges, lead), rng.integers(0, vocab, lead))
    targets = np.where(rng.random(lead) < 0.2, logits.argmax(-1), targets)
    return {"hidden": hidden, "lm_head": lm_head, "logits": logits, "targets": targets, "chunk_size": chunk_size,
            "temperature": draw(st.floats(0.3, 3.0))}


@settings(deadline=None, max_examples=40)
@given(case=chunked_cases())
def test_chunked_statistics_equal_the_direct_computation(case):
    """token_stats_from_hidden, over any number of chunks (one, several, a narrower last one, one token each),
    gives the statistics of the full logits: those of token_stats_from_logits and the float64 reference."""
    logits, targets, temperature = case["logits"], case["targets"], case["temperature"]
    # Full float32 matmul precision (not TF32 / bf16 passes on accelerators): the one-hot products stay exact.
    with jax.default_matmul_precision("float32"):
        chunked = stats_of_hidden(jnp.asarray(case["hidden"]), jnp.asarray(case["lm_head"]), jnp.asarray(targets),
                                  temperature, chunk_size=case["chunk_size"])
    assert_stats_close(chunked, stats_of_logits(jnp.asarray(logits), jnp.asarray(targets), temperature))
    assert_stats_close(chunked, naive_stats(logits, targets, temperature))
    vocab = logits.shape[-1]
    flat = np.asarray(chunked.flatness)
    assert np.all(flat >= vocab**-0.5 * (1 - RTOL)) and np.all(flat <= 1 + 1e-6), (flat.min(), flat.max())
    # Row 0: equal logits, the uniform distribution.
    first = {name: float(np.asarray(getattr(chunked, name)).reshape(-1)[0]) for name in FIELDS}
    assert first["flatness"] == pytest.approx(1.0, abs=1e-6)
    assert first["entropy"] == pytest.approx(np.log(vocab), rel=RTOL)
    assert first["top1_prob"] == pytest.approx(1.0 / vocab, rel=RTOL)


def _intermediate_sizes(jaxpr) -> list[int]:
    """Element counts of every value computed in a jaxpr, sub-jaxprs (the scan body) included."""
    sizes = []
    for eqn in jaxpr.eqns:
        sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    sizes += _intermediate_sizes(sub)
    return sizes


@pytest.mark.parametrize("chunk_size", [8, 30])
def test_fused_never_builds_the_full_logits(chunk_size):
    n, vocab, dim = 64, 97, 4
    hidden, lm_head = grid_matmul_inputs(n, vocab, dim, seed=0)
    jaxpr = jax.make_jaxpr(lambda h, w, t: token_stats_from_hidden(h, w, t, chunk_size=chunk_size))(
        hidden, lm_head, np.zeros(n, np.int32))
    sizes = _intermediate_sizes(jaxpr.jaxpr)
    assert max(sizes) == n * chunk_size  # the per-chunk logits are the largest value
    assert max(sizes) < n * vocab


@pytest.mark.parametrize("axes,vocab_axis,chunk_size,temperature", [
    ({"tensor": 8}, "tensor", 16, 1.0),
    ({"data": 2, "tensor": 4}, "tensor", 7, 0.7),
    ({"data": 2, "fsdp": 2, "tensor": 2}, ("fsdp", "tensor"), 1000, 1.3),
], ids=["tensor8", "data2_tensor4_uneven_chunks", "two_vocab_axes"])
def test_vocab_parallel_statistics_equal_one_device_and_never_gather_the_head(axes, vocab_axis, chunk_size,
                                                                            temperature):
    """Each device reduces its own rows of a vocabulary-split head; the combined sums are the whole
    vocabulary's, with the target token on any device's rows."""
    assert jax.device_count() == 8
    rows, length, vocab, dim = 4, 6, 8 * 40, 16
    rng = np.random.default_rng(5)
    hidden = rng.standard_normal((rows, length, dim)).astype(np.float32) * 3
    lm_head = rng.standard_normal((vocab, dim)).astype(np.float32)
    targets = rng.integers(0, vocab, (rows, length)).astype(np.int32)
    mesh = jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(axes))
    row_axes = "data" if "data" in axes else None
    head_spec = jax.sharding.PartitionSpec(vocab_axis)
    place = jax.sharding.NamedSharding
    args = (jax.device_put(hidden, place(mesh, jax.sharding.PartitionSpec(row_axes))),
            jax.device_put(lm_head, place(mesh, head_spec)),
            jax.device_put(targets, place(mesh, jax.sharding.PartitionSpec(row_axes))))
    parallel = jax.jit(lambda h, w, t: token_stats_vocab_parallel(h, w, t, mesh, vocab_axis, row_axes, temperature,
                                                                  chunk_size))
    got = parallel(*args)
    want = token_stats_from_hidden(hidden, lm_head, targets, temperature, chunk_size)
    for field in FIELDS:
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=RTOL, atol=NATS_ATOL,
                                   err_msg=field)
    hlo = parallel.lower(*args).compile().as_text()
    assert f"f32[{vocab},{dim}]" not in hlo, "the whole head was gathered onto a device"


def test_vocab_parallel_needs_an_axis_that_divides_the_vocabulary():
    mesh = jax.make_mesh((8,), ("tensor",))
    with pytest.raises(ValueError, match=r"mesh axis 'tensor' of size 8 does not divide the vocabulary \(100\)"):
        token_stats_vocab_parallel(np.zeros((1, 4), np.float32), np.zeros((100, 4), np.float32),
                                   np.zeros(1, np.int32), mesh, "tensor", None)


def test_fused_bfloat16_accumulates_in_float32():
    n, vocab, dim = 16, 50, 64
    rng = np.random.default_rng(3)
    hidden = jnp.asarray(rng.standard_normal((n, dim)), jnp.bfloat16)
    lm_head = jnp.asarray(rng.standard_normal((vocab, dim)) * 0.5, jnp.bfloat16)
    targets = rng.integers(0, vocab, n)
    logits = np.asarray(hidden, np.float64) @ np.asarray(lm_head, np.float64).T  # |logits| ~ 4, up to ~15
    fused = stats_of_hidden(hidden, lm_head, jnp.asarray(targets), chunk_size=16)
    want = stats_of_logits(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
    # Products of bfloat16 values are exact in float32, but backends may sum them in any order
    # (and tensor cores in blocks), so allow float32-accumulation noise over D = 64 terms with
    # margin. Logits rounded to bfloat16 (8 bits) would miss by ~1e-2 and fail.
    assert_stats_close(fused, want, rtol=1e-4, nats_atol=1e-4)
    rounded = stats_of_logits(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
    with pytest.raises(AssertionError):
        assert_stats_close(rounded, want, rtol=1e-4, nats_atol=1e-4)


def random_token_stats(shape: tuple[int, ...], rng: np.random.Generator) -> TokenStats:
    return TokenStats(*(jnp.asarray(rng.uniform(0.1, 1.0, shape), jnp.float32) for _ in FIELDS))


def naive_means(stats: TokenStats, loss: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """Means of one sample, from its own [S] arrays."""
    trained = (loss != 0) & (valid != 0)
    out = {name: np.asarray(getattr(stats, name))[trained].mean() if trained.any() else np.nan for name in FIELDS}
    out["flatness_all"] = np.asarray(stats.flatness)[valid != 0].mean() if valid.any() else np.nan
    out["n_trained_tokens"], out["n_tokens"] = trained.sum(), (valid != 0).sum()
    return out


def test_packed_segments_equal_unpacked_samples():
    rng = np.random.default_rng(4)
    lengths = [5, 3, 4, 2]
    losses = [np.array([0, 0, 1, 1, 1]), np.zeros(3, int), np.array([1, 0, 1, 1]), np.array([0, 1])]
    per_sample = [random_token_stats((n,), rng) for n in lengths]
    # An untrained position may carry an infinite nll (say, a placeholder target whose logit
    # was masked); it must not turn its sample's trained mean into NaN.
    per_sample[0] = per_sample[0]._replace(nll=per_sample[0].nll.at[0].set(jnp.inf))

    # Packed: row 0 = samples 0, 1; row 1 = samples 2, 3, then padding; slot 3 stays empty.
    rows, width, slots = [(0, 1), (2, 3)], 8, 3
    packed_fields = {name: np.full((2, width), np.nan, np.float32) for name in FIELDS}  # NaN must not leak
    segment_ids = np.zeros((2, width), np.int32)
    packed_loss = np.ones((2, width), np.int32)  # loss on padding must be ignored
    for r, members in enumerate(rows):
        start = 0
        for slot, i in enumerate(members):
            end = start + lengths[i]
            for name in FIELDS:
                packed_fields[name][r, start:end] = getattr(per_sample[i], name)
            segment_ids[r, start:end] = slot + 1
            packed_loss[r, start:end] = losses[i]
            start = end
    packed = means_of_segments(TokenStats(**{k: jnp.asarray(v) for k, v in packed_fields.items()}),
                           jnp.asarray(packed_loss), jnp.asarray(segment_ids), num_segments=slots)

    # Unpacked: one sample per row, left-aligned, NaN stats and loss 1 on padding.
    unpacked_fields = {name: np.full((4, width), np.nan, np.float32) for name in FIELDS}
    valid = np.zeros((4, width), np.int32)
    loss = np.ones((4, width), np.int32)
    for i, n in enumerate(lengths):
        for name in FIELDS:
            unpacked_fields[name][i, :n] = getattr(per_sample[i], name)
        valid[i, :n], loss[i, :n] = 1, losses[i]
    unpacked = means_of_samples(TokenStats(**{k: jnp.asarray(v) for k, v in unpacked_fields.items()}),
                            jnp.asarray(loss), jnp.asarray(valid))

    for key, value in unpacked.items():
        assert value.shape == (4,) and packed[key].shape == (2, slots), key
    for r, members in enumerate(rows):
        for slot, i in enumerate(members):
            want = naive_means(per_sample[i], losses[i], np.ones(lengths[i]))
            for key, value in want.items():
                np.testing.assert_allclose(packed[key][r, slot], value, rtol=1e-6, err_msg=key)
                np.testing.assert_allclose(unpacked[key][i], value, rtol=1e-6, err_msg=key)
    # Sample 1 has no trained token: NaN trained means, but a finite mean over all its tokens.
    for key in ("flatness", "entropy", "top1_prob", "nll"):
        assert np.isnan(unpacked[key][1]) and np.isnan(packed[key][0, 1])
    assert np.isfinite(unpacked["flatness_all"][1]) and np.isfinite(packed["flatness_all"][0, 1])
    # The empty third slot counts nothing and averages to NaN.
    assert (np.asarray(packed["n_tokens"][:, 2]) == 0).all() and np.isnan(packed["flatness_all"][:, 2]).all()


def test_end_to_end_jitted_and_eager():
    """The other tests call the module-level jitted functions; this one also runs them eagerly."""
    rng = np.random.default_rng(5)
    hidden, lm_head = grid_matmul_inputs(6, 41, 8, seed=5)
    hidden = hidden.reshape(2, 3, 8)  # leading dims other than [N] work too
    targets = rng.integers(0, 41, (2, 3))
    logits = hidden.astype(np.float64) @ lm_head.T.astype(np.float64)
    want = naive_stats(logits, targets, 0.8)
    args = jnp.asarray(hidden), jnp.asarray(lm_head), jnp.asarray(targets), 0.8
    logit_args = jnp.asarray(logits, jnp.float32), jnp.asarray(targets), 0.8
    for got in (stats_of_logits(*logit_args), token_stats_from_logits(*logit_args),
                stats_of_hidden(*args, chunk_size=16), token_stats_from_hidden(*args, chunk_size=16)):
        assert_stats_close(got, want)

    fused = stats_of_hidden(*args, chunk_size=16)
    loss = jnp.asarray([[0, 1, 1], [1, 1, 0]])
    want_nll = [want["nll"][0, 1:].mean(), want["nll"][1, :2].mean()]
    want_flat_all = [want["flatness"][0, :2].mean(), want["flatness"][0, 2]]
    for samples, segments in (
        (means_of_samples, means_of_segments),
        (sample_stats, segment_stats),
    ):
        np.testing.assert_allclose(samples(fused, loss, jnp.ones((2, 3)))["nll"], want_nll, rtol=RTOL)
        by_segment = segments(fused, loss, jnp.asarray([[1, 1, 2], [1, 1, 1]]), num_segments=2)
        np.testing.assert_allclose(by_segment["flatness_all"][0], want_flat_all, rtol=RTOL)
