"""The architecture of a Llama-family checkpoint, normalised from an HF ``config.json``.

GGUF metadata is translated into the same HF config keys first (see ``gguf_reader``), so
both formats go through one validation path: :meth:`ArchSpec.from_hf_config`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from flatspec_jax.weights.errors import WeightsError

# model_type -> the HF class whose weights we read (config.json "architectures").
SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_SUPPORTED = ", ".join(f"{t} ({c})" for t, c in SUPPORTED_MODEL_TYPES.items())
_SUPPORTED_ROPE_TYPES = "default, llama3"
# HF's defaults where a config may leave a field out (transformers' config classes).
_DEFAULT_ROPE_THETA = 10000.0
_MISTRAL_DEFAULT_SLIDING_WINDOW = 4096
_QWEN2_DEFAULT_SLIDING_WINDOW = 4096
_QWEN2_DEFAULT_MAX_WINDOW_LAYERS = 28

_REQUIRED: Any = object()


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency-dependent RoPE scaling (HF ``rope_type: "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """What the model builder needs to know about a checkpoint.

    Tensor shapes follow from it (HF orientation, ``[out, in]``): q_proj
    ``[num_heads * head_dim, hidden_size]``, k/v_proj ``[num_kv_heads * head_dim, hidden_size]``,
    o_proj ``[hidden_size, num_heads * head_dim]``, gate/up_proj ``[intermediate_size, hidden_size]``,
    down_proj ``[hidden_size, intermediate_size]``, embed_tokens and lm_head
    ``[vocab_size, hidden_size]``.

    Attributes:
      architecture: HF ``model_type``: "llama", "mistral" or "qwen2" (GGUF files: "llama" or "qwen2").
      attention_bias: q/k/v projections have biases (always for Qwen2; never for Llama, see
        :meth:`from_hf_config`, and Mistral). There is never an o_proj bias.
      tie_word_embeddings: the output projection is ``model.embed_tokens.weight``; the checkpoint
        then has no ``lm_head.weight``.
      eos_token_ids: every id that ends generation (HF ``eos_token_id`` may be an int or a list).
      sliding_window: keys further back than this many positions are masked, in every layer, or
        None for full causal attention. Set only where transformers would apply it: Mistral's
        ``sliding_window`` (HF applies it whenever it is not null), Qwen2's only with
        ``use_sliding_window`` and every layer sliding (HF's ``layer_types``).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], source: str) -> ArchSpec:
        """Validates an HF config dict (the contents of ``config.json``) into an ArchSpec.

        Fields that transformers' config classes default (num_key_value_heads, head_dim,
        rope_theta, tie_word_embeddings, token ids, sliding window) get the same defaults here;
        the shape-defining ones must be present.

        Args:
          config: the parsed ``config.json``.
          source: the file it came from, named in every error.

        Raises:
          WeightsError: naming ``source`` and the field, for a missing or invalid field, an
            unsupported ``model_type``/``architectures``, or a feature the model does not
            implement (RoPE types other than default/llama3, biases other than Qwen2's q/k/v,
            activations other than SiLU, per-layer sliding windows).
        """
        cfg = _Fields(config, source)
        model_type = config.get("model_type")
        if model_type is None:
            raise cfg.error("model_type", f"is missing; supported: {_SUPPORTED}")
        if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
            raise cfg.error("model_type", f"is {model_type!r}, which is not supported; supported: {_SUPPORTED}")
        architectures = config.get("architectures")
        if architectures is not None and SUPPORTED_MODEL_TYPES[model_type] not in architectures:
            raise cfg.error("architectures", f"is {architectures!r}; for model_type {model_type!r} only "
                                             f"{SUPPORTED_MODEL_TYPES[model_type]} is supported")
        quantization = config.get("quantization_config")
        if quantization is not None:
            method = quantization.get("quant_method") if isinstance(quantization, Mapping) else None
            raise cfg.error("quantization_config", f"names a quantised checkpoint ({method or 'unknown method'}); "
                                                   "only float weights load (use the unquantised checkpoint)")
        activation = cfg.string("hidden_act", default="silu")
        if activation != "silu":
            raise cfg.error("hidden_act", f"is {activation!r}; only 'silu' is supported")

        hidden = cfg.integer("hidden_size")
        num_heads = cfg.integer("num_attention_heads")
        num_kv_heads = cfg.integer("num_key_value_heads", default=num_heads)
        if num_heads % num_kv_heads:
            raise cfg.error("num_key_value_heads",
                            f"= {num_kv_heads} does not divide num_attention_heads = {num_heads}")
        head_dim = cfg.integer("head_dim", default=None)
        if head_dim is None:
            if hidden % num_heads:
                raise cfg.error("head_dim", f"is missing and hidden_size = {hidden} is not a multiple of "
                                            f"num_attention_heads = {num_heads}")
            head_dim = hidden // num_heads
        if head_dim % 2:
            raise cfg.error("head_dim", f"= {head_dim} is odd; RoPE rotates pairs of dimensions")
        max_positions = cfg.integer("max_position_embeddings")
        rope_theta, rope_scaling = _rope(config, cfg, max_positions)

        return cls(
            architecture=model_type,
            vocab_size=cfg.integer("vocab_size"),
            hidden_size=hidden,
            intermediate_size=cfg.integer("intermediate_size"),
            num_layers=cfg.integer("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.number("rms_norm_eps"),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            attention_bias=_attention_bias(model_type, cfg),
            tie_word_embeddings=cfg.flag("tie_word_embeddings", default=False),
            max_position_embeddings=max_positions,
            bos_token_id=cfg.integer("bos_token_id", default=None, minimum=0),
            eos_token_ids=cfg.token_ids("eos_token_id"),
            sliding_window=_sliding_window(model_type, cfg, config),
        )

    def to_json(self) -> str:
        """This spec as JSON (inverse: :meth:`from_json`)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> ArchSpec:
        """Reads :meth:`to_json`'s output back.

        Raises:
          WeightsError: naming ``source`` when the text is not such a spec.
        """
        try:
            fields = json.loads(text)
            scaling = fields["rope_scaling"]
            fields["rope_scaling"] = None if scaling is None else RopeScaling(**scaling)
            fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
            return cls(**fields)
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{source}: stored architecture is unreadable ({e})") from e


def with_generation_stops(arch: ArchSpec, generation_config: Any, source: str) -> ArchSpec:
    """``arch`` whose ``eos_token_ids`` also hold a ``generation_config.json``'s ``eos_token_id``
    (Llama-3-8B-Instruct's config.json named only <|end_of_text|>, its generation config <|eot_id|> too).

    Raises:
      WeightsError: naming ``source`` when it is not a JSON object or its ids are not token ids.
    """
    if not isinstance(generation_config, Mapping):
        raise WeightsError(f"{source}: not a JSON object")
    extra = _Fields(generation_config, source).token_ids("eos_token_id")
    return dataclasses.replace(arch, eos_token_ids=tuple(dict.fromkeys(arch.eos_token_ids + extra)))


def value_settings(config: Mapping[str, Any], source: str, *, max_positions: int,
                   rms_norm_eps: float) -> dict[str, Any]:
    """The fields of an HF-style ``config`` that change a layer's values but not its shapes:
    ``rope_theta`` (default 10000), ``rope_scaling`` (a :class:`RopeScaling` or None) and
    ``rms_norm_eps`` (default ``rms_norm_eps``), read as :meth:`ArchSpec.from_hf_config` reads them.

    Raises:
      WeightsError: naming ``source`` and the field, for a malformed or unsupported value.
    """
    cfg = _Fields(config, source)
    theta, scaling = _rope(config, cfg, max_positions)
    return {"rope_theta": theta, "rope_scaling": scaling, "rms_norm_eps": cfg.number("rms_norm_eps", rms_norm_eps)}


def _attention_bias(model_type: str, cfg: _Fields) -> bool:
    if model_type == "qwen2":
        return True  # Qwen2Attention always has q/k/v biases; its config has no switch.
    if cfg.flag("mlp_bias", default=False):
        raise cfg.error("mlp_bias", "is true; MLP biases are not supported")
    # HF Llama's attention_bias also gives o_proj a bias, which our attention lacks: loading
    # such a checkpoint would silently drop it, so refuse.
    if cfg.flag("attention_bias", default=False):
        raise cfg.error("attention_bias", "is true (q/k/v *and* o_proj biases); an o_proj bias is not supported")
    return False


def _rope(config: Mapping[str, Any], cfg: _Fields, max_positions: int) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from legacy ``rope_theta``/``rope_scaling`` or transformers 5's
    ``rope_parameters``; like transformers, a non-empty ``rope_scaling`` wins."""
    key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    params = config.get(key) or {}
    if not isinstance(params, Mapping):
        raise cfg.error(key, f"must be an object, got {params!r}")
    if any(isinstance(v, Mapping) for v in params.values()):
        raise cfg.error(key, "holds per-layer-type RoPE parameters, which are not supported")
    rope = _Fields(params, cfg.source, prefix=f"{key}.")
    theta = rope.number("rope_theta", default=cfg.number("rope_theta", default=_DEFAULT_ROPE_THETA))
    if rope.number("partial_rotary_factor", default=cfg.number("partial_rotary_factor", default=1.0)) != 1.0:
        raise rope.error("partial_rotary_factor", "is not 1; partial RoPE is not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise rope.error("rope_type", f"is {rope_type!r}, which is not supported; supported: {_SUPPORTED_ROPE_TYPES}")
    scaling = RopeScaling(
        factor=rope.number("factor"),
        low_freq_factor=rope.number("low_freq_factor"),
        high_freq_factor=rope.number("high_freq_factor"),
        # transformers fills this in from max_position_embeddings when absent.
        original_max_position_embeddings=rope.integer("original_max_position_embeddings", default=max_positions),
    )
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise rope.error("high_freq_factor", f"= {scaling.high_freq_factor} must exceed "
                                             f"low_freq_factor = {scaling.low_freq_factor}")
    return theta, scaling


def _sliding_window(model_type: str, cfg: _Fields, config: Mapping[str, Any]) -> int | None:
    """The window transformers would apply in every layer (see ArchSpec.sliding_window)."""
    if model_type == "llama":
        return None
    if model_type == "mistral":
        # MistralConfig defaults an absent key to 4096 but keeps an explicit null.
        if "sliding_window" not in config:
            return _MISTRAL_DEFAULT_SLIDING_WINDOW
        return cfg.integer("sliding_window", default=None)
    if not cfg.flag("use_sliding_window", default=False):
        return None
    if "sliding_window" in config and config["sliding_window"] is None:
        return None  # Qwen2Config keeps an explicit null, and then every layer attends fully
    window = cfg.integer("sliding_window", default=_QWEN2_DEFAULT_SLIDING_WINDOW)
    num_layers = cfg.integer("num_hidden_layers")
    first_sliding = cfg.integer("max_window_layers", default=_QWEN2_DEFAULT_MAX_WINDOW_LAYERS, minimum=0)
    # transformers 5 writes layer_types; older configs imply it from max_window_layers.
    layer_types = config.get("layer_types") or [
        "sliding_attention" if i >= first_sliding else "full_attention" for i in range(num_layers)]
    if set(layer_types) == {"full_attention"}:
        return None
    if set(layer_types) == {"sliding_attention"}:
        return window
    field = "layer_types" if config.get("layer_types") else "max_window_layers"
    raise cfg.error(field, f"gives layer types {sorted(set(layer_types))}; only all-full or all-sliding "
                           "attention is supported")


class _Fields:
    """Typed reads from one config mapping; every failure names the field and the file.

    A null value reads as absent, as in transformers' configs.
    """

    def __init__(self, values: Mapping[str, Any], source: str, prefix: str = ""):
        self.values = values
        self.source = source
        self.prefix = prefix

    def error(self, key: str, problem: str) -> WeightsError:
        return WeightsError(f"{self.source}: field {self.prefix}{key} {problem}")

    def _get(self, key: str, default: Any) -> Any:
        """The value, or None when absent and ``default`` applies."""
        value = self.values.get(key)
        if value is None and default is _REQUIRED:
            raise self.error(key, "is missing")
        return value

    def integer(self, key: str, default: Any = _REQUIRED, minimum: int = 1) -> Any:
        value = self._get(key, default)
        if value is None:
            return default
        # bool is an int subclass in Python; JSON true is not a count.
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def number(self, key: str, default: Any = _REQUIRED) -> float:
        """A positive float."""
        value = self._get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise self.error(key, f"must be a positive number, got {value!r}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def string(self, key: str, default: str) -> str:
        value = self._get(key, default)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {value!r}")
        return value

    def token_ids(self, key: str) -> tuple[int, ...]:
        value = self._get(key, ())
        if value is None:
            return ()
        ids = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(ids, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise self.error(key, f"must be a token id or a list of them, got {value!r}")
        return tuple(ids)
