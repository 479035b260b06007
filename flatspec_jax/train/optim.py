"""The draft's optimizer: AdamW with linear warm-up, a decay schedule and gradient clipping."""

from __future__ import annotations

import optax

from flatspec_jax.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 over ``warmup_steps`` (capped at ``steps``), then cosine or linear decay
    to 0 at ``steps``, or constant."""
    warmup = min(cfg.warmup_steps, cfg.steps)
    decay_steps = max(cfg.steps - warmup, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
    else:
        after = optax.constant_schedule(cfg.learning_rate)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), after], [warmup])


def build_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Gradient clipping, then AdamW on the schedule."""
    clip = (optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip_mode == "norm"
            else optax.clip(cfg.grad_clip))
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    return optax.chain(clip, adamw)
