"""Tests for flatspec_jax.train.optim against closed forms and an independent NumPy AdamW.

The training tests run the optimizer only with a constant rate or compare runs that share one
schedule, so the schedule's shape and the clipping mode are checked here on their own.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flatspec_jax.config import TrainConfig
from flatspec_jax.train.optim import build_optimizer, learning_rate_schedule

LR = 0.3


def expected_rate(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Linear warm-up from 0 over min(warmup, steps) steps, then decay to 0 at ``steps`` (or constant)."""
    warmup = min(warmup, steps)
    if step < warmup:
        return LR * step / warmup
    if schedule == "constant":
        return LR
    progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
    return LR * (0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("steps, warmup", [(13, 3), (11, 0), (5, 7)])
def test_schedule_warms_up_then_decays_to_zero_at_the_last_step(schedule, steps, warmup):
    rate = learning_rate_schedule(TrainConfig(steps=steps, warmup_steps=warmup, schedule=schedule, learning_rate=LR))
    got = [float(rate(step)) for step in range(steps + 2)]
    want = [expected_rate(step, steps, warmup, schedule) for step in range(steps + 2)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    if schedule != "constant" and warmup < steps:
        assert got[steps] == pytest.approx(0.0, abs=1e-7)


def numpy_adamw(params: np.ndarray, grads: list[np.ndarray], cfg: TrainConfig) -> np.ndarray:
    """Clipping (global norm or per element), then AdamW with bias correction, at a constant rate (float64)."""
    p, m, v = params.astype(np.float64), np.zeros_like(params, np.float64), np.zeros_like(params, np.float64)
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        if cfg.grad_clip_mode == "norm":
            g = g * min(1.0, cfg.grad_clip / np.linalg.norm(g))
        else:
            g = np.clip(g, -cfg.grad_clip, cfg.grad_clip)
        m = cfg.b1 * m + (1 - cfg.b1) * g
        v = cfg.b2 * v + (1 - cfg.b2) * g * g
        m_hat, v_hat = m / (1 - cfg.b1 ** t), v / (1 - cfg.b2 ** t)
        p = p - cfg.learning_rate * (m_hat / (np.sqrt(v_hat) + 1e-8) + cfg.weight_decay * p)
    return p


@pytest.mark.parametrize("mode", ["norm", "value"])
def test_optimizer_clips_as_configured_then_applies_adamw(mode):
    cfg = TrainConfig(steps=10, warmup_steps=0, schedule="constant", learning_rate=0.05, grad_clip=0.5,
                      grad_clip_mode=mode, weight_decay=0.1, b1=0.9, b2=0.95)
    params = np.asarray([1.0, -2.0, 0.5, 3.0, -0.25], np.float32)
    # A large first gradient (clipped differently by the two modes), then small ones.
    grads = [np.asarray([3.0, -4.0, 0.2, 0.05, -7.0], np.float32), np.asarray([0.1, 0.3, -0.2, 0.05, 0.02], np.float32),
             np.asarray([-0.4, 0.1, 0.3, -0.05, 0.2], np.float32)]
    tx = build_optimizer(cfg)
    p, state = jnp.asarray(params), tx.init(jnp.asarray(params))
    for g in grads:
        updates, state = tx.update(jnp.asarray(g), state, p)
        p = optax.apply_updates(p, updates)
    np.testing.assert_allclose(np.asarray(p), numpy_adamw(params, grads, cfg), rtol=1e-5, atol=1e-6)
    other = numpy_adamw(params, grads, dataclasses.replace(cfg, grad_clip_mode="value" if mode == "norm" else "norm"))
    assert np.abs(np.asarray(p) - other).max() > 1e-3  # the two modes are told apart
