"""Turning logits into the distribution we sample from: temperature and top-p (nucleus).

Shape legend: V vocabulary; ``...`` any leading dims.
Temperature 0 means greedy; it is a static setting, so greedy and sampled decoding compile
to different programs and greedy never touches random numbers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Static settings of the sampled distribution (hashable: part of the compiled program)."""

    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def warped_log_probs(logits: Array, settings: SamplingSettings) -> Array:
    """[..., V] logits -> [..., V] float32 log-probabilities after temperature and top-p.

    Tokens outside the nucleus get -inf. The nucleus is the smallest set of most likely
    tokens whose probability reaches ``top_p`` (the token that crosses it is kept).
    Only meaningful when not greedy.
    """
    logits = logits.astype(jnp.float32) / settings.temperature
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if settings.top_p >= 1.0:
        return log_probs
    sorted_log_probs = jnp.sort(log_probs, axis=-1)[..., ::-1]
    # Probability mass strictly before each sorted token; keep tokens whose preceding mass < top_p.
    mass_before = jnp.cumsum(jnp.exp(sorted_log_probs), axis=-1) - jnp.exp(sorted_log_probs)
    kept = mass_before < settings.top_p
    threshold = jnp.min(jnp.where(kept, sorted_log_probs, jnp.inf), axis=-1, keepdims=True)
    return jax.nn.log_softmax(jnp.where(log_probs >= threshold, log_probs, -jnp.inf), axis=-1)


def warped_probs(logits: Array, settings: SamplingSettings) -> Array:
    """[..., V] probabilities of the decoding distribution; one-hot argmax when greedy."""
    if settings.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jnp.exp(warped_log_probs(logits, settings))


def sample(key: Array, logits: Array, settings: SamplingSettings) -> Array:
    """Draws one token per leading index: [..., V] -> [...] int32 (argmax when greedy)."""
    if settings.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, warped_log_probs(logits, settings), axis=-1).astype(jnp.int32)
