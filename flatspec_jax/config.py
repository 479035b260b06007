"""Typed run configuration: one frozen dataclass per stage, loaded from YAML and validated.

A run is described by one YAML file (see ``configs/``) whose top-level keys are the
fields of :class:`Config`. Every value is checked against its type hint when loaded, so
a typo or a wrong type fails at start-up with the key path at fault rather than hours
into a run. ``--set key.path=value`` on the command line goes through the same checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key at fault."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The frozen target model."""

    path: str | None = None
    """HF directory (config.json + safetensors) or a .gguf file; null = embedded SmolLM2."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Activation and matmul-input dtype of the target forward; every product accumulates in float32
    and norms, softmax and flatness statistics run in float32. On a CPU with AVX512-BF16 bfloat16
    scores 1.6-1.7x faster (SFDD selections agree to 99%) but decodes ~0.6x as fast, and greedy
    speculative output can differ from autoregressive at near-tied logits (BENCHMARKS.md)."""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype the target parameters are stored in on device."""

    def __post_init__(self) -> None:
        _require(self.path is None or bool(self.path.strip()), "model.path",
                 "must name a model directory or .gguf file (null = the embedded SmolLM2)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where conversations come from and how they become token sequences."""

    source: str = "sharegpt"
    """'sharegpt' (embedded file), or a path to ShareGPT JSON, JSONL or parquet."""
    responses: Literal["source", "target"] = "source"
    """Assistant turns to train on: the source's own, or 'target': the target's replies to the
    source's user turns (flatspec regenerate; settings under regenerate)."""
    limit: int | None = None
    """Maximum number of valid conversations to use (file order); null = all."""
    max_length: int = 512
    """Tokens per sample after the chat template; longer samples are truncated."""
    selection: str | None = None
    """Selection manifest for training: a path, 'run' (the run directory's selection.json) or null (all data)."""
    heldout: int = 16
    """Samples held out of training (the last ones in file order) for draft agreement metrics. ShareGPT
    splits long chats into records <chat>_<part>: the first held-out records may continue a chat whose
    earlier parts are trained on (later turns of the same chat)."""
    shuffle_seed: int = 0
    """Seed of the training data order."""
    num_workers: int = 0
    """Grain worker processes (0 = in-process)."""

    def __post_init__(self) -> None:
        _require(bool(self.source.strip()), "data.source", "must name a file, directory or 'sharegpt'")
        _require(self.selection is None or bool(self.selection.strip()), "data.selection",
                 "must be null, 'run' or a manifest path")
        _require(self.max_length >= 8, "data.max_length", "must be >= 8")
        _require(self.limit is None or self.limit > 0, "data.limit", "must be positive or null")
        _require(self.heldout >= 0, "data.heldout", "must be >= 0")
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _require(0 <= self.shuffle_seed < 2**32, "data.shuffle_seed", "must be in [0, 2**32)")


@dataclasses.dataclass(frozen=True)
class RegenerateConfig:
    """Target-generated training data (``data.responses: target``): each conversation's first
    ``turns`` user turns answered by the target in turn, its own earlier replies as context."""

    turns: int = 1
    """User turns answered per conversation; later turns are dropped."""
    max_new_tokens: int = 256
    """Tokens per reply at most (a reply cut here is kept as it is)."""
    temperature: float = 0.0
    """0 = greedy: the replies the target gives at decode.temperature 0."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off)."""
    batch_size: int = 8
    """Conversations decoded together."""
    flush_every: int = 4
    """Batches per part file (what an interrupted run keeps)."""

    def __post_init__(self) -> None:
        _require(self.turns >= 1, "regenerate.turns", "must be >= 1")
        _require(self.max_new_tokens > 0, "regenerate.max_new_tokens", "must be > 0")
        _require(self.temperature >= 0, "regenerate.temperature", "must be >= 0")
        _require(0 < self.top_p <= 1, "regenerate.top_p", "must be in (0, 1]")
        _require(self.batch_size >= 1, "regenerate.batch_size", "must be >= 1")
        _require(self.flush_every >= 1, "regenerate.flush_every", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """The flatness scoring pass."""

    temperature: float = 1.0
    """Temperature T of p = softmax(z / T) for every statistic."""
    vocab_chunk: int = 1024
    """Vocabulary rows per chunk of the fused LM-head + statistics kernel; each step holds
    [tokens, chunk] float32 logits, which at 1024 stay in a CPU's caches (larger suits accelerators). With
    mesh.tensor > 1 each device reduces only its own vocabulary rows, in chunks of this size."""
    row_length: int = 512
    """Tokens per packed row; several samples share a row (>= data.max_length)."""
    rows_per_batch: int = 4
    """Packed rows per scoring step (global, across data-parallel devices)."""
    flush_every: int = 8
    """Batches between atomic writes of finished rows (bounds work lost to a crash)."""

    def __post_init__(self) -> None:
        _require(self.temperature > 0, "score.temperature", "must be > 0")
        _require(self.vocab_chunk > 0, "score.vocab_chunk", "must be > 0")
        _require(self.row_length >= 8, "score.row_length", "must be >= 8")
        _require(self.rows_per_batch > 0, "score.rows_per_batch", "must be > 0")
        _require(self.flush_every > 0, "score.flush_every", "must be > 0")


SelectRule = Literal["sfdd", "random", "entropy", "flatness_low", "nll", "all"]


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """Which scored samples train the draft."""

    rule: SelectRule = "sfdd"
    """sfdd: highest flatness; random (seeded by `seed`); entropy: highest; flatness_low: lowest; nll: highest; all."""
    keep: float = 0.5
    """Fraction of samples kept, in (0, 1]."""

    def __post_init__(self) -> None:
        _require(0.0 < self.keep <= 1.0, "select.keep", "must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    """The EAGLE draft head."""

    num_layers: int = 1
    """Decoder layers in the head (the reference uses 1)."""
    vocab: int = 0
    """Train the head over the N tokens most frequent among the assistant tokens of the run's samples
    before the held-out tail (EOS always in; EAGLE-3's reduced draft vocabulary): the loss compares
    draft and target distributions renormalised over them, so its LM-head work is N / V of the
    whole. The ids are saved with the checkpoint and the head drafts only from them. 0 = the whole
    vocabulary (EAGLE-1/2); else at least 3, as the top-3 agreement metrics need, and at least
    `decode.top_k` unless `decode.method` is `chain` (eval drafts a tree from these tokens)."""

    def __post_init__(self) -> None:
        _require(self.num_layers >= 1, "draft.num_layers", "must be >= 1")
        _require(self.vocab == 0 or self.vocab >= 3, "draft.vocab",
                 "must be 0 (the whole vocabulary) or at least 3 (the top-3 agreement metrics rank three tokens)")


LossName = Literal["eagle", "kl", "tvd", "tvdpp", "lk", "lk_hybrid"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Draft-head training."""

    steps: int = 200
    """Optimizer steps."""
    batch_tokens: int = 2048
    """Tokens per optimizer step (rows x row_length x grad_accum)."""
    row_length: int = 512
    """Tokens per packed training row."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step, weighted by trained tokens: the same step as one batch
    (with train.noise > 0 up to the noise, drawn per micro-batch)."""
    loss: LossName = "eagle"
    """Token term: eagle (soft cross-entropy), kl, tvd, tvdpp, lk (-log acceptance), lk_hybrid."""
    feature_weight: float = 1.0
    """v_w: weight of the SmoothL1 feature-regression term (0 disables it)."""
    token_weight: float = 0.1
    """p_w: weight of the token-distribution term."""
    noise: float = 0.2
    """Uniform noise on input features: U(-a/2, a/2) x 512 / (sample length), as in EAGLE."""
    unroll: int = 1
    """Training-time test (EAGLE-3, HASS): drafts trained per position. Draft k > 1 reads the head's own
    draft k - 1 features and attends the context as decoding does; 1 = EAGLE-1/2 training."""
    unroll_decay: float = 0.8
    """Weight of draft k's loss: unroll_decay ** (k - 1) (EAGLE-3's 0.8)."""
    loss_chunk: int = 64
    """Positions per chunk of the loss's LM-head work; chunks without trained positions are skipped."""
    features: Literal["online", "offline"] = "online"
    """online: the frozen target runs inside the train step; offline: read a feature cache."""
    learning_rate: float = 3e-5
    """Peak learning rate (the EAGLE reference uses 3e-5 on 68k conversations)."""
    warmup_steps: int = 20
    """Linear warm-up steps (capped at train.steps)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up: to 0 at train.steps (cosine, linear) or none (constant)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (PyTorch's AdamW default, which the EAGLE reference uses)."""
    b1: float = 0.9
    """AdamW beta1."""
    b2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 0.5
    """Gradient clipping threshold."""
    grad_clip_mode: Literal["norm", "value"] = "norm"
    """norm: clip the global norm; value: clip each element to +-grad_clip (the EAGLE reference's choice)."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """Draft compute dtype; master parameters stay float32. On a CPU with AMX the demo's step ran
    ~1.2x faster in bfloat16 at the same held-out agreement (BENCHMARKS.md)."""
    log_every: int = 10
    """Steps between metrics.jsonl records (the only host syncs of the loop); only these steps
    compute the training agreement metrics (acceptance, top-1, top-3)."""
    eval_every: int = 50
    """Steps between held-out evaluations (top-1/top-3 agreement, losses); an evaluated step is also logged."""
    save_every: int = 50
    """Steps between orbax checkpoints."""
    keep_checkpoints: int = 3
    """Most recent checkpoints kept, plus the one with the lowest held-out loss among the saved steps
    that were evaluated (those a multiple of both save_every and eval_every, and the last)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_tokens", "row_length", "grad_accum", "loss_chunk", "log_every", "eval_every",
                     "save_every", "keep_checkpoints"):
            _require(getattr(self, name) > 0, f"train.{name}", "must be > 0")
        _require(self.batch_tokens % (self.row_length * self.grad_accum) == 0, "train.batch_tokens",
                 f"must be a multiple of train.row_length x train.grad_accum "
                 f"({self.row_length} x {self.grad_accum})")
        _require(self.learning_rate > 0, "train.learning_rate", "must be > 0")
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _require(self.grad_clip > 0, "train.grad_clip", "must be > 0")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _require(0 <= self.b1 < 1, "train.b1", "must be in [0, 1)")
        _require(0 <= self.b2 < 1, "train.b2", "must be in [0, 1)")
        _require(self.noise >= 0, "train.noise", "must be >= 0")
        _require(self.unroll >= 1, "train.unroll", "must be >= 1")
        _require(0 < self.unroll_decay <= 1, "train.unroll_decay", "must be in (0, 1]")
        _require(self.feature_weight >= 0, "train.feature_weight", "must be >= 0")
        _require(self.token_weight >= 0, "train.token_weight", "must be >= 0")

    @property
    def rows_per_step(self) -> int:
        """Packed rows per micro-batch."""
        return self.batch_tokens // (self.row_length * self.grad_accum)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: axis sizes multiply to the device count; -1 takes the remaining devices."""

    data: int = -1
    """Data-parallel axis (batch rows)."""
    fsdp: int = 1
    """Fully-sharded axis: batch rows and parameters' embed dimension."""
    tensor: int = 1
    """Tensor-parallel axis: heads, MLP and vocabulary dimensions."""

    def __post_init__(self) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            _require(size == -1 or size >= 1, f"mesh.{name}", "must be >= 1 or -1")
        _require(sum(s == -1 for s in sizes.values()) <= 1, "mesh", "at most one axis may be -1")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process start-up (jax.distributed). Unset fields are read from the environment."""

    enabled: bool | None = None
    """null: initialise when the environment names a cluster (TPU pod, SLURM, the variables below)."""
    coordinator_address: str | None = None
    """host:port of process 0 (else JAX_COORDINATOR_ADDRESS or cluster auto-detection)."""
    num_processes: int | None = None
    """Processes in the job (else JAX_NUM_PROCESSES or auto-detection)."""
    process_id: int | None = None
    """This process's index (else JAX_PROCESS_ID or auto-detection)."""

    def __post_init__(self) -> None:
        if self.coordinator_address is not None:
            host, _, port = self.coordinator_address.rpartition(":")
            _require(bool(host) and port.isdigit(), "distributed.coordinator_address",
                     f"expected host:port, got {self.coordinator_address!r}")
        _require(self.num_processes is None or self.num_processes >= 1, "distributed.num_processes", "must be >= 1")
        _require(self.process_id is None or self.process_id >= 0, "distributed.process_id", "must be >= 0")
        _require(self.process_id is None or self.num_processes is None or self.process_id < self.num_processes,
                 "distributed.process_id", f"must be < distributed.num_processes ({self.num_processes})")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Generation and speculative decoding."""

    method: Literal["ar", "chain", "tree"] = "tree"
    """ar: plain autoregressive (generate; eval, which always compares against autoregressive decoding, then
    evaluates a tree); chain: gamma drafts in a line; tree: EAGLE-2 dynamic tree."""
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off)."""
    max_new_tokens: int = 128
    """Tokens generated per prompt at most."""
    gamma: int = 4
    """Chain speculation: drafted tokens per round (the most, with min_confidence)."""
    min_confidence: float = 0.0
    """Chain speculation: draft j is proposed only while the draft's confidence in it, its
    probability of the drafts before j times its top probability for j (softmax at temperature 1,
    no top-p; EAGLE-2's confidence), is at least this; each round verifies the batch's longest
    proposed chain, so rounds where the draft is unsure cost about one autoregressive step.
    Output is unchanged (lossless either way). 0 = always gamma drafts."""
    depth: int = 5
    """Tree speculation: expansion steps after the root's children (the reference's depth), so a
    tree has up to depth + 1 draft levels and a round accepts up to depth + 1 drafts."""
    top_k: int = 8
    """Tree speculation: children expanded per level."""
    total_tokens: int = 63
    """Tree speculation: tokens verified per round, the root included (EAGLE's total_token)."""
    draft_vocab: int = 0
    """Draft proposals only from the N tokens most frequent among the assistant tokens of the run's
    samples before the held-out tail (EOS always in; FR-Spec); cuts the draft's LM-head work by
    V / N at some cost in acceptance. Output is unchanged (lossless either way). 0 = the whole
    vocabulary; else at least `decode.top_k` when `decode.method` is `tree`. A head trained with
    draft.vocab always drafts from its own saved tokens (this must then be 0 or their count)."""
    max_cache_length: int = 2048
    """KV-cache slots per row (prompt + generated + one round of drafts)."""
    scan_layers: bool = False
    """Decode with the target's layers under one scan over their stacked weights (compile time
    independent of depth). False (the default) runs them one after another over per-layer copies
    of the weights and per-layer KV caches: a scanned step copies every layer's weights out of
    the stack, which made autoregressive decoding of SmolLM2 on CPU ~1.35-1.45x slower. The
    copies take the memory of the target's layers a second time."""

    def __post_init__(self) -> None:
        _require(self.temperature >= 0, "decode.temperature", "must be >= 0")
        _require(0 < self.top_p <= 1, "decode.top_p", "must be in (0, 1]")
        _require(self.max_new_tokens > 0, "decode.max_new_tokens", "must be > 0")
        _require(self.max_cache_length > 0, "decode.max_cache_length", "must be > 0")
        for name in ("gamma", "depth", "top_k"):
            _require(getattr(self, name) >= 1, f"decode.{name}", "must be >= 1")
        _require(0 <= self.min_confidence < 1, "decode.min_confidence", "must be in [0, 1)")
        _require(self.draft_vocab >= 0, "decode.draft_vocab", "must be >= 0 (0 = the whole vocabulary)")
        _require(self.min_confidence == 0 or self.method == "chain", "decode.min_confidence",
                 "applies to chain speculation only (decode.method=chain)")
        if self.method != "chain":  # the tree's settings (eval falls back to a tree when method is ar)
            most = 1 + self.top_k + self.depth * self.top_k ** 2
            _require(2 <= self.total_tokens <= most, "decode.total_tokens",
                     f"must be between 2 and 1 + top_k + depth x top_k^2 = {most}")
            _require(self.draft_vocab == 0 or self.draft_vocab >= self.top_k, "decode.draft_vocab",
                     f"must be 0 (whole vocabulary) or at least decode.top_k ({self.top_k})")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Speculative-decoding evaluation."""

    prompts: str = "mtbench"
    """'mtbench' (embedded 80 questions) or a JSONL of prompts ({'prompt': ...} or {'turns': [...]})."""
    limit: int | None = None
    """Number of prompts (file order); null = all."""
    turns: int = 1
    """MT-bench turns per question (1 or 2)."""
    warmup: int = 1
    """Batches run once before timing, to exclude compilation."""
    batch_size: int = 1
    """Prompts decoded together, both ways (rows accept different lengths per round); tokens/s and
    speedup are then throughputs at this batch size."""

    def __post_init__(self) -> None:
        _require(bool(self.prompts.strip()), "eval.prompts", "must be 'mtbench' or a JSONL path")
        _require(self.turns in (1, 2), "eval.turns", "must be 1 or 2")
        _require(self.limit is None or self.limit > 0, "eval.limit", "must be positive or null")
        _require(self.warmup >= 0, "eval.warmup", "must be >= 0")
        _require(self.batch_size >= 1, "eval.batch_size", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """jax.profiler traces of a few steps of `score` and `train` (process 0), for XProf / TensorBoard."""

    steps: int = 0
    """Consecutive steps traced per stage (scoring batches, training steps) into run_dir/profile/<stage>; 0 = none."""
    start: int = 3
    """First traced step, counted from 1 among the steps the command runs (the first compiles)."""

    def __post_init__(self) -> None:
        _require(self.steps >= 0, "profile.steps", "must be >= 0")
        _require(self.start >= 1, "profile.start", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run: every stage of (regenerate ->) score -> select -> train -> eval."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    regenerate: RegenerateConfig = RegenerateConfig()
    score: ScoreConfig = ScoreConfig()
    select: SelectConfig = SelectConfig()
    draft: DraftConfig = DraftConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    decode: DecodeConfig = DecodeConfig()
    eval: EvalConfig = EvalConfig()
    profile: ProfileConfig = ProfileConfig()
    seed: int = 0
    """Seed of the draft's initialisation, training noise, sampling (eval, generate, and regenerate at
    `regenerate.temperature` > 0, whose replies are redone for a new seed) and `select.rule: random`. Not the
    data order (`data.shuffle_seed`)."""
    run_dir: str = "runs/default"
    """Where every output of the run is written."""

    def __post_init__(self) -> None:
        _require(bool(self.run_dir.strip()), "run_dir", "must name a directory")
        _require(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)")
        _require(self.score.row_length >= self.data.max_length, "score.row_length",
                 f"must be >= data.max_length ({self.data.max_length}): each sample is scored within one row")
        _require(self.decode.method == "chain" or self.draft.vocab == 0 or self.draft.vocab >= self.decode.top_k,
                 "draft.vocab", f"must be 0 or at least decode.top_k ({self.decode.top_k}): a tree drafts top_k "
                 "children from the head's tokens (eval decodes a tree unless decode.method=chain)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Short content hash of the named top-level sections (what a stage's output depends on).

        ``model`` is hashed without ``model.path`` (as if it were null): fingerprints compare the model's
        files by content (:func:`~flatspec_jax.fingerprint.model_identity`), so a moved or re-spelled
        path keeps a run's outputs current."""
        unplaced = dataclasses.replace(self.model, path=None)
        payload = json.dumps({s: _jsonable(unplaced if s == "model" else getattr(self, s)) for s in sections},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (),
                spelled: typing.Mapping[str, str] | None = None) -> Config:
    """Reads a YAML config (or the defaults when ``path`` is None) and applies ``key.path=value`` overrides.

    ``spelled`` maps an override to the words that gave it (a verb flag such as ``--top-p 2``), which
    errors quote instead of ``--set key.path=value``.

    Raises:
      ConfigError: naming the file and key for an unknown key, a wrong type or a value out of range.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            with open(path, encoding="utf-8") as handle:  # a file object: YAML's error marks name it
                raw = yaml.load(handle, Loader=_UniqueKeyLoader) or {}
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from err
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    given: dict[str, str] = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {override!r}: expected key.path=value")
        key, given_as = key.strip(), (spelled or {}).get(override, f"--set {override}")
        keys = key.split(".")
        if not value.strip():
            takes_none = type(None) in typing.get_args(_field_hint(keys))
            raise ConfigError(f"{given_as}: empty value" + (f" (write {key}=null for none)" if takes_none else ""))
        _set_path(raw, keys, _parse_value(value, _field_hint(keys)), source)
        given[key] = given_as
    try:
        return _build(Config, raw, prefix="")
    except ConfigError as err:
        # Blame the --sets that gave a key the message names (the key at fault, a section holding it, or the
        # other key of a rule between two), or else the file.
        message = str(err)
        key = message.partition(";")[0][len("unknown key "):] if message.startswith("unknown key ") else \
            message.partition(":")[0]
        named = [key, *re.findall(r"\b[a-z_]+(?:\.[a-z_]+)+\b", message.partition(":")[2])]
        culprits = [o for k, o in given.items() if any(k == n or k.startswith(n + ".") for n in named)]
        raise ConfigError(f"{', '.join(culprits) or source}: {err}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _field_hint(keys: list[str]) -> Any:
    """The type hint of the field ``keys`` names in :class:`Config`; None for a section or an unknown key
    (which ``_build`` then reports)."""
    hint: Any = Config
    for key in keys:
        if not dataclasses.is_dataclass(hint):
            return None
        hint = typing.get_type_hints(hint).get(key)
    return None if dataclasses.is_dataclass(hint) else hint


def _parse_value(text: str, hint: Any) -> Any:
    """A ``--set`` value, read by the type of the field it sets (``null`` is None for any field):

    * text (``str``, ``str | None``, a choice of strings): the text as written, so that a path may hold
      ``#`` or ``: `` (YAML would cut ``runs/a #2`` to ``runs/a``), unquoted if it is quoted (``'a b'``);
    * integers: decimal digits only (YAML reads ``010`` as 8 and ``1:30`` as 90); anything else is
      left as text for the type check to refuse;
    * everything else as YAML reads it (``3e-5``, ``true``, ``[1, 2]``), or the text where it is not YAML.
    """
    if text.strip() == "null":
        return None
    options = [o for o in typing.get_args(hint) if o is not type(None)] if typing.get_origin(hint) in (
        typing.Union, types.UnionType) else [hint]
    if all(o is str or (typing.get_origin(o) is Literal and all(isinstance(a, str) for a in typing.get_args(o)))
           for o in options):
        quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
        return _yaml_or_text(text) if quoted else text
    if options == [int]:
        return int(text) if re.fullmatch(r"\s*[+-]?[0-9]+\s*", text) else text
    return _yaml_or_text(text)


def _yaml_or_text(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_path(raw: dict[str, Any], keys: list[str], value: Any, source: str) -> None:
    node, prefix = raw, ""
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            given_by = source if source != "defaults" else "an earlier --set"  # the file, unless no file
            raise ConfigError(f"--set {'.'.join(keys)}: needs {prefix}{key} to be a section, but {given_by} gives "
                              f"it the value {child!r}")
        node, prefix = child, f"{prefix}{key}."
    node[keys[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)  # YAML keys may be numbers too
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; valid keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}")
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, f"{prefix}{name}")
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(str(err)) from None


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Checks ``value`` against a type hint, converting only where lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {hint}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads exponents without a dot ("3e-5") as strings; accept them as numbers.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")


def config_reference() -> str:
    """Markdown table of every key, its type, default and description (for the README)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        docs = _field_docs(cls)
        for field in dataclasses.fields(cls):
            hint = hints[field.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{field.name}.")
                continue
            default = field.default
            type_name = _type_name(hint)
            lines.append(f"| `{prefix}{field.name}` | {type_name} | `{json.dumps(default)}` | "
                         f"{docs.get(field.name, '')} |")

    walk(Config, "")
    return "\n".join(lines)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _field_docs(cls: type) -> dict[str, str]:
    """Reads the string literal that follows each field in the class body (its attribute docstring)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


if __name__ == "__main__":
    print(config_reference())
