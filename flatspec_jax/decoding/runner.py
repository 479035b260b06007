"""Host-side driver of the jitted decoders: padding, settings, timing, and turning ids into text.

One :class:`Decoder` serves ``flatspec generate`` and ``flatspec eval`` alike: it pads a batch of
prompts to a fixed width (so every call with the same width reuses one compiled program),
sizes the KV caches, runs autoregressive or speculative decoding and times it.

Shape legend: B rows, W padded prompt width, M max new tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flatspec_jax.config import ConfigError, DecodeConfig
from flatspec_jax.decoding.autoregressive import GenerationSettings, generate
from flatspec_jax.decoding.sampling import SamplingSettings
from flatspec_jax.decoding.speculative import SpeculativeSettings, speculative_generate
from flatspec_jax.models.eagle import EagleHead
from flatspec_jax.models.llama import Llama

log = logging.getLogger(__name__)

PROMPT_BUCKET = 64
"""Prompt widths are rounded up to a multiple of this, bounding the number of compiled programs."""
CACHE_BUCKET = 128


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _on_host(value: jax.Array | None) -> np.ndarray | None:
    return None if value is None else np.asarray(value)


@dataclasses.dataclass(frozen=True)
class DecodeResult:
    """One batch of decoded rows.

    Attributes:
      tokens: per row, the generated ids up to and including EOS (if one came).
      seconds: wall time of the jitted call (after the device finished).
      target_calls: [B] target forwards after the prefill (AR: one per token; speculative: rounds).
      accept_counts: [B, A + 1] histogram of accepted drafts per round (speculative only).
      exhausted_counts: [B, A + 1] of those, the rounds with nothing proposed after the accepted
        drafts (speculative only; ``SpeculativeGeneration.exhausted_counts``).
      drafts: [B] drafts proposed for verification over all rounds (speculative only).
    """

    tokens: list[np.ndarray]
    seconds: float
    target_calls: np.ndarray
    accept_counts: np.ndarray | None
    exhausted_counts: np.ndarray | None
    drafts: np.ndarray | None

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


class Decoder:
    """Autoregressive (``head`` None or method 'ar') or speculative decoding of prompt batches.

    ``draft_ids`` ([N] ascending token ids, e.g. from
    :func:`~flatspec_jax.decoding.draft_vocab.frequent_token_ids`) restricts the draft's
    proposals to those tokens; None lets it propose any.
    """

    def __init__(self, target: Llama, cfg: DecodeConfig, eos_ids: Sequence[int], pad_id: int,
                 head: EagleHead | None = None, method: str | None = None, draft_ids: np.ndarray | None = None):
        self.cfg = cfg
        self.method = method or cfg.method
        if self.method != "ar" and head is None:
            raise ConfigError(f"decode.method={self.method!r} needs a draft head (pass --draft or train one)")
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.pad_id = int(pad_id)
        self.target_graphdef, self.target_params = nnx.split(target)
        self.head_graphdef, self.head_params = (None, None) if head is None else nnx.split(head)
        self.draft_ids = None if draft_ids is None else jnp.asarray(draft_ids, jnp.int32)
        self._capped_widths: set[int] = set()

    @property
    def speculative(self) -> bool:
        return self.method != "ar"

    def _round_tokens(self) -> int:
        """Target positions one speculative round may write beyond the committed ones."""
        if not self.speculative:
            return 1
        return 1 + (self.cfg.gamma if self.method == "chain" else self.cfg.total_tokens - 1)

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt that leaves a cache slot for a new token: ``decode.max_cache_length - 1``."""
        return self.cfg.max_cache_length - 1

    def prompt_width(self, longest: int) -> int:
        """W for prompts of up to ``longest`` tokens: rounded up to :data:`PROMPT_BUCKET`, but below
        ``decode.max_cache_length`` (a prompt that fits the cache is never refused for its padding).

        Raises:
          ConfigError: when the longest prompt leaves no cache slot for a new token.
        """
        if longest > self.max_prompt_tokens:
            raise ConfigError(f"a prompt of {longest} tokens leaves no room for a new token in "
                              f"decode.max_cache_length={self.cfg.max_cache_length}")
        return min(round_up(longest, PROMPT_BUCKET), self.max_prompt_tokens)

    def cache_length(self, width: int) -> int:
        """Cache slots for prompts padded to ``width``: prompt, every new token and one round of drafts."""
        needed = round_up(width + self.cfg.max_new_tokens + self._round_tokens(), CACHE_BUCKET)
        if width >= self.cfg.max_cache_length:
            raise ConfigError(f"prompts padded to {width} tokens do not fit decode.max_cache_length="
                             f"{self.cfg.max_cache_length}")
        if needed > self.cfg.max_cache_length and width not in self._capped_widths:
            self._capped_widths.add(width)
            log.warning("decode.max_cache_length=%d is below the %d slots that prompts padded to %d tokens, "
                        "decode.max_new_tokens=%d and one round of %d verified tokens need: long rows stop early "
                        "(%s decoding stops a row once a round no longer fits)", self.cfg.max_cache_length,
                        width + self.cfg.max_new_tokens + self._round_tokens(), width, self.cfg.max_new_tokens,
                        self._round_tokens(), self.method)
        return min(needed, self.cfg.max_cache_length)

    def _settings(self, width: int):
        generation = GenerationSettings(
            max_new_tokens=self.cfg.max_new_tokens, cache_length=self.cache_length(width), eos_ids=self.eos_ids,
            sampling=SamplingSettings(self.cfg.temperature, self.cfg.top_p), pad_id=self.pad_id)
        if not self.speculative:
            return generation
        return SpeculativeSettings(generation=generation, method=self.method, gamma=self.cfg.gamma,
                                   depth=self.cfg.depth, top_k=self.cfg.top_k,
                                   total_tokens=self.cfg.total_tokens - 1, min_confidence=self.cfg.min_confidence)

    def run(self, prompts: Sequence[np.ndarray], key: jax.Array, width: int | None = None) -> DecodeResult:
        """Decodes a batch of prompt id arrays (each of at least one token), right-padded to ``width``
        (default: :meth:`prompt_width`)."""
        if not prompts or min(len(p) for p in prompts) < 1:
            raise ValueError("decoding needs a non-empty batch of prompts of at least one token each")
        longest = max(len(p) for p in prompts)
        width = width or self.prompt_width(longest)
        if longest > width:
            raise ValueError(f"a prompt of {longest} tokens exceeds the padded width {width}")
        padded = np.full((len(prompts), width), self.pad_id, np.int32)
        for row, prompt in enumerate(prompts):
            padded[row, :len(prompt)] = prompt
        lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
        settings = self._settings(width)
        start = time.perf_counter()
        if self.speculative:
            out = speculative_generate(self.target_graphdef, self.target_params, self.head_graphdef,
                                       self.head_params, jnp.asarray(padded), lengths, key, settings,
                                       self.draft_ids)
            calls, accept_counts, exhausted_counts, drafts = (out.rounds, out.accept_counts, out.exhausted_counts,
                                                              out.drafts)
        else:
            out = generate(self.target_graphdef, self.target_params, jnp.asarray(padded), lengths, key, settings)
            calls, accept_counts, exhausted_counts, drafts = out.target_calls, None, None, None
        jax.block_until_ready(out.tokens)
        seconds = time.perf_counter() - start
        tokens, counts = np.asarray(out.tokens), np.asarray(out.lengths)
        return DecodeResult(tokens=[tokens[row, :counts[row]] for row in range(len(prompts))], seconds=seconds,
                            target_calls=np.asarray(calls), accept_counts=_on_host(accept_counts),
                            exhausted_counts=_on_host(exhausted_counts), drafts=_on_host(drafts))

    def text(self, tokenizer, tokens: np.ndarray) -> str:
        """The reply text of generated ids (EOS and special tokens dropped)."""
        kept = tokens[~np.isin(tokens, self.eos_ids)]
        return tokenizer.decode(kept, skip_special_tokens=True).strip()
