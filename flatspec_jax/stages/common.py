"""What several stages share: the run directory, the target model and tokenizer, the mesh and
the tokenized samples, loaded lazily and at most once per process (so ``flatspec pipeline``
loads the target once for all its stages)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from flatspec_jax import assets
from flatspec_jax.checkpoint.manager import CHECKPOINT_DIR, load_draft_head, read_meta, trained_draft_vocab, vocab_hash
from flatspec_jax.config import Config, ConfigError
from flatspec_jax.data.prepare import TOKENS_FILE, prepare_samples, tokens_fingerprint
from flatspec_jax.data.regenerate import regenerate, responses_are_current
from flatspec_jax.data.tokenized import TokenizedDataset
from flatspec_jax.data.tokenizer import load_tokenizer
from flatspec_jax.decoding.draft_vocab import frequent_token_ids
from flatspec_jax.models.eagle import EagleHead
from flatspec_jax.models.llama import Llama, split_layers
from flatspec_jax.sharding import ShardingRules, check_process_rows, make_mesh
from flatspec_jax.weights.to_nnx import load_target_model

log = logging.getLogger(__name__)


def arg(args: Any, name: str, default: Any = None) -> Any:
    """A verb flag's value, or ``default`` when unset (or when a stage is called without CLI args)."""
    value = getattr(args, name, None)
    return default if value is None else value


def target_path(cfg: Config) -> str:
    """The target checkpoint: ``model.path`` or the embedded SmolLM2 GGUF."""
    return cfg.model.path or str(assets.smollm2_gguf())


class RunContext:
    """One run's shared, lazily loaded resources."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)

    @functools.cached_property
    def model_path(self) -> str:
        """The target checkpoint (:func:`target_path`)."""
        return target_path(self.cfg)

    @functools.cached_property
    def tokenizer(self):
        return load_tokenizer(self.model_path)

    @functools.cached_property
    def mesh(self) -> Mesh:
        """The job's mesh (``mesh.*``), refused before anything is placed on it when it leaves a process out."""
        mesh = make_mesh(self.cfg.mesh)
        check_process_rows(mesh)
        log.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, mesh.devices.flat[0].platform)
        return mesh

    @functools.cached_property
    def rules(self) -> ShardingRules:
        return ShardingRules()

    @functools.cached_property
    def target(self) -> Llama:
        return load_target_model(self.model_path, self.mesh, self.rules, dtype=self.cfg.model.dtype,
                                 param_dtype=self.cfg.model.param_dtype)

    @functools.cached_property
    def decoding_target(self) -> Llama:
        """The target laid out for decoding: per-layer weights and caches unless ``decode.scan_layers``."""
        return self.target if self.cfg.decode.scan_layers else split_layers(self.target)

    @functools.cached_property
    def responses(self) -> dict[str, Any] | None:
        """With ``data.responses: target``, the meta record of the run's target-generated replies
        (regenerated unless current); None when training on the source's own replies."""
        if self.cfg.data.responses == "source":
            return None
        return regenerate(self.cfg, self.decoding_target, self.tokenizer, self.eos_ids(), self.pad_id(),
                          self.model_path)

    @functools.cached_property
    def samples(self) -> TokenizedDataset:
        """The run's tokenized samples (``tokens.npz``)."""
        self.responses  # noqa: B018 - the conversations the samples are built from
        return prepare_samples(self.cfg.data, self.model_path, self.tokenizer, self.run_dir)

    def draft_head(self, directory: str | Path | None = None) -> EagleHead:
        """The draft head of an orbax checkpoint directory (default: this run's ``checkpoints/``),
        checked against this target and tokenizer."""
        directory = Path(directory) if directory else self.run_dir / CHECKPOINT_DIR
        return load_draft_head(directory, self.target.arch, vocab_hash(self.tokenizer), self.mesh, self.rules,
                               dtype=self.cfg.model.dtype)

    def built_samples(self) -> TokenizedDataset:
        """The run's tokenized samples as an earlier verb built them, never built or rewritten here (for
        ``generate``, which writes nothing into a run directory).

        Raises:
          ConfigError: they are missing, or not this config's (other data settings or target replies).
        """
        hint = (f"run `flatspec score` (or `flatspec pipeline`) with this config in {self.run_dir} first, or set "
                "decode.draft_vocab=0")
        if self.cfg.data.responses == "target" and not responses_are_current(self.cfg, self.model_path):
            raise ConfigError(f"decode.draft_vocab counts the run's samples, built from target replies in "
                              f"{self.run_dir} that are missing or not this config's: {hint}")
        path = self.run_dir / TOKENS_FILE
        samples = TokenizedDataset.load(path, tokens_fingerprint(self.cfg.data, self.model_path, self.run_dir))
        if samples is None:
            raise ConfigError(f"decode.draft_vocab counts the run's samples, but {path} is missing or was built "
                              f"with other data settings: {hint}")
        return samples

    def draft_ids(self, size: int | None = None, setting: str = "decode.draft_vocab",
                  read_only: bool = False) -> np.ndarray | None:
        """[N] a reduced draft vocabulary: the N tokens most frequent among the assistant tokens of the
        run's samples before the held-out tail (what a draft proposes; the selection is not applied,
        so eval's decode.draft_vocab gets the same ids as training), EOS ids
        always in. N: ``size`` (the value of config ``setting``), default ``decode.draft_vocab``;
        None when it is 0. ``read_only``: count the samples an earlier verb built
        (:meth:`built_samples`) rather than build them."""
        size = self.cfg.decode.draft_vocab if size is None else size
        vocab = self.target.arch.vocab_size
        if not size:
            return None
        if size > vocab:
            raise ConfigError(f"{setting}={size} exceeds the target's vocabulary ({vocab} tokens)")
        samples = self.built_samples() if read_only else self.samples
        end = samples.offsets[max(len(samples) - self.cfg.data.heldout, 0)]
        assistant = samples.tokens[:end][samples.loss_mask[:end] > 0]
        ids = frequent_token_ids(assistant, vocab, size, self.eos_ids())
        log.info("draft vocabulary: the %d most frequent of %d tokens", size, vocab)
        return ids

    def decoding_draft_ids(self, checkpoint: str | Path | None = None, size: int | None = None,
                           read_only: bool = False) -> np.ndarray | None:
        """[N] the ids the draft head of ``checkpoint`` (default: this run's) proposes from when decoding.

        A head trained on a reduced vocabulary (``draft.vocab``) drafts from the ids saved with it;
        any other head from :meth:`draft_ids` of ``size`` (default ``decode.draft_vocab``; ``read_only``
        as there).

        Raises:
          ConfigError: when the head has its own vocabulary and ``size`` asks for another size, or a
            tree's ``decode.top_k`` exceeds it.
        """
        directory = Path(checkpoint) if checkpoint else self.run_dir / CHECKPOINT_DIR
        trained = trained_draft_vocab(read_meta(directory)[1])
        size = self.cfg.decode.draft_vocab if size is None else size
        if trained is None:
            return self.draft_ids(size, read_only=read_only)
        if size not in (0, len(trained)):
            raise ConfigError(f"decode.draft_vocab={size}: the draft head in {directory} was trained to propose from "
                              f"its own {len(trained)} tokens (draft.vocab); set decode.draft_vocab to 0 or "
                              f"{len(trained)}")
        top_k = self.cfg.decode.top_k
        if self.cfg.decode.method != "chain" and top_k > len(trained):  # eval decodes a tree for method ar
            raise ConfigError(f"decode.top_k={top_k}: the draft head in {directory} proposes from its own "
                              f"{len(trained)} tokens (draft.vocab); use decode.top_k <= {len(trained)} or "
                              "decode.method=chain")
        log.info("draft vocabulary: the %d tokens the head was trained on", len(trained))
        return trained

    def eos_ids(self) -> tuple[int, ...]:
        return self.target.arch.eos_token_ids or (self.tokenizer.eos_token_id,)

    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
