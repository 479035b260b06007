"""The public EAGLE-1/EAGLE-2 draft-head format (SafeAILab/EAGLE ``cnets.py``) <-> our EagleHead.

A head directory holds:

    config.json          a Llama (or Qwen2) config of the draft: the target's layer shape with
                         ``num_hidden_layers`` = draft layers, plus the reference's own keys
                         ``bias`` (fc has a bias; absent = true) and ``qkv_bias`` (q/k/v biases,
                         Qwen2 targets). Our exports add a ``flatspec`` block naming the target
                         (its ArchSpec and tokenizer-vocabulary hash).
    model.safetensors    the state dict (safetensors, ``format: pt``)
    pytorch_model.bin    the same state dict, ``torch.save``d (EAGLE-1 reads only this file)

State-dict keys, PyTorch ``[out, in]`` orientation (H hidden, V vocab):

    embed_tokens.weight                           [V, H]   the target's embedding (frozen; the
                                                           reference loads strict, so it is present)
    fc.weight [H, 2H], fc.bias [H]                          fc over concat(embedding, feature)
    layers.{i}.self_attn.{q,k,v,o}_proj.weight              (+ q/k/v ``.bias`` with qkv_bias)
    layers.{i}.mlp.{gate,up,down}_proj.weight
    layers.{i}.input_layernorm.weight                      only for i >= 1
    layers.{i}.post_attention_layernorm.weight

No final norm and no LM head (the target's are used). Our parameters map onto these keys
through :data:`flatspec_jax.weights.layout.LAYER_TENSORS`, the table the target loader uses:
``first_layer/<path>`` is layer 0, ``more_layers/layers/<path>`` (stacked) layers 1..L-1.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from flatspec_jax.checkpoint.manager import CheckpointMismatchError
from flatspec_jax.models.eagle import draft_arch
from flatspec_jax.weights.arch import ArchSpec, value_settings
from flatspec_jax.weights.errors import WeightsError
from flatspec_jax.weights.layout import LAYER_TENSORS, Kind, hf_to_nnx, nnx_to_hf
from flatspec_jax.weights.safetensors_reader import SafetensorsFile, write_safetensors

log = logging.getLogger(__name__)

REFERENCE_RMS_NORM_EPS = 1e-6
"""The reference's ``rms_norm_eps`` for a head config.json without one (its EConfig default)."""

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_NAME = "pytorch_model.bin"
EMBED_KEY = "embed_tokens.weight"
FORMAT_VERSION = 1
EXPORT_DTYPES = ("float32", "bfloat16", "float16")

_LAYER_BY_PATH = {t.nnx_path: t for t in LAYER_TENSORS}
_SUFFIX_ORDER = {t.hf_suffix: n for n, t in enumerate(LAYER_TENSORS)}
_FIRST = "first_layer/"
_MORE = "more_layers/layers/"
# Head-config fields that fix tensor shapes: they must equal the target's.
_SHAPE_FIELDS = (("hidden_size", "hidden_size"), ("num_attention_heads", "num_heads"),
                 ("num_key_value_heads", "num_kv_heads"), ("head_dim", "head_dim"),
                 ("intermediate_size", "intermediate_size"), ("vocab_size", "vocab_size"))


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """Where one reference tensor goes in our flat parameters.

    Attributes:
      flat_key: our parameter, as keyed by :func:`~flatspec_jax.checkpoint.manager.flatten_params`.
      hf_key: the reference state-dict key.
      kind: the layout conversion (see :mod:`flatspec_jax.weights.layout`).
      index: for the stacked layers 1..L-1, the index along the stack axis; else None.
    """

    flat_key: str
    hf_key: str
    kind: Kind
    index: int | None


def tensor_slots(flat_shapes: Mapping[str, tuple[int, ...]]) -> list[TensorSlot]:
    """Every reference tensor of a head whose flat parameters have these shapes, in key order.

    Raises:
      KeyError: for a parameter that has no reference counterpart.
    """
    slots = []
    for key, shape in flat_shapes.items():
        if key == "fc":
            slots.append(TensorSlot(key, "fc.weight", "linear", None))
        elif key == "fc_bias":
            slots.append(TensorSlot(key, "fc.bias", "identity", None))
        elif key.startswith(_FIRST) and tuple(key[len(_FIRST):].split("/")) in _LAYER_BY_PATH:
            spec = _LAYER_BY_PATH[tuple(key[len(_FIRST):].split("/"))]
            slots.append(TensorSlot(key, f"layers.0.{spec.hf_suffix}", spec.kind, None))
        elif key.startswith(_MORE) and tuple(key[len(_MORE):].split("/")) in _LAYER_BY_PATH:
            spec = _LAYER_BY_PATH[tuple(key[len(_MORE):].split("/"))]
            slots.extend(TensorSlot(key, f"layers.{j + 1}.{spec.hf_suffix}", spec.kind, j) for j in range(shape[0]))
        else:
            raise KeyError(f"draft parameter {key} has no EAGLE reference tensor")
    return sorted(slots, key=lambda s: _key_order(s.hf_key))


def _key_order(hf_key: str) -> tuple:
    if hf_key == EMBED_KEY:
        return (0,)
    if hf_key.startswith("fc."):
        return (1, hf_key)
    _, layer, suffix = hf_key.split(".", 2)
    return (2, int(layer), _SUFFIX_ORDER.get(suffix, len(_SUFFIX_ORDER)), suffix)


def to_state_dict(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat head parameters (host arrays) -> the reference state dict, without the embedding."""
    out = {}
    for slot in tensor_slots({k: np.shape(v) for k, v in flat.items()}):
        array = np.asarray(flat[slot.flat_key])
        if slot.index is not None:
            array = array[slot.index]
        out[slot.hf_key] = np.ascontiguousarray(nnx_to_hf(slot.kind, array))
    return out


_EAGLE3_KEYS = frozenset({"d2t", "t2d"})
_EAGLE3_PREFIXES = ("midlayer.",)
"""Tensors only the EAGLE-3 reference head holds: its layer (``midlayer``) and vocabulary maps."""


def from_state_dict(tensors: Mapping[str, np.ndarray], flat_shapes: Mapping[str, tuple[int, ...]], source: str,
                    dtype: str = "float32") -> dict[str, np.ndarray]:
    """The reference state dict -> our flat head parameters (host arrays of ``dtype``).

    ``embed_tokens.weight`` is not a head parameter and is skipped (check it separately).

    Raises:
      CheckpointMismatchError: naming ``source`` and the tensor for a missing or unexpected
        tensor, or one whose shape does not fit the head built for the target.
    """
    slots = tensor_slots(flat_shapes)
    expected = {s.hf_key for s in slots}
    eagle3 = sorted(k for k in tensors if k in _EAGLE3_KEYS or k.startswith(_EAGLE3_PREFIXES))
    if eagle3:
        raise CheckpointMismatchError(f"{source}: an EAGLE-3 head (tensor {eagle3[0]!r}; {len(eagle3)} such): its "
                                      "layer reads fused features of three target layers and drafts over its own "
                                      "vocabulary; only EAGLE-1/2 heads are imported")
    missing = [s.hf_key for s in slots if s.hf_key not in tensors]
    if missing:
        raise CheckpointMismatchError(f"{source}: no tensor {missing[0]!r} ({len(missing)} missing of the "
                                      f"{len(expected)} the head needs)")
    unexpected = sorted((k for k in tensors if k not in expected and k != EMBED_KEY), key=_sort_key_safe)
    if unexpected:
        raise CheckpointMismatchError(f"{source}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all; "
                                      "not an EAGLE-1/2 head of this shape, or num_hidden_layers / bias / qkv_bias "
                                      "in config.json do not match its tensors)")
    parts: dict[str, list[np.ndarray]] = {}
    out = {}
    for slot in slots:
        shape = tuple(flat_shapes[slot.flat_key])
        want = shape if slot.index is None else shape[1:]
        try:
            array = hf_to_nnx(slot.kind, np.asarray(tensors[slot.hf_key]), want, slot.hf_key)
        except ValueError as err:
            raise CheckpointMismatchError(f"{source}: {err}") from None
        array = array.astype(dtype)
        if slot.index is None:
            out[slot.flat_key] = array
        else:
            parts.setdefault(slot.flat_key, []).append(array)
    for key, arrays in parts.items():
        out[key] = np.stack(arrays)
    return out


def _sort_key_safe(key: str) -> tuple:
    try:
        return _key_order(key)
    except ValueError:
        return (3, key)


# ----------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------


def head_config(draft: ArchSpec, target: ArchSpec, *, fc_bias: bool, target_vocab_hash: str, dtype: str,
                pad_token_id: int | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` of an exported head: every field the reference reads, plus our ``flatspec`` block."""
    qwen2 = target.architecture == "qwen2"
    config: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": draft.vocab_size,
        "hidden_size": draft.hidden_size,
        "intermediate_size": draft.intermediate_size,
        "num_hidden_layers": draft.num_layers,
        "num_attention_heads": draft.num_heads,
        "num_key_value_heads": draft.num_kv_heads,
        "head_dim": draft.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": draft.max_position_embeddings,
        "rms_norm_eps": draft.rms_norm_eps,
        "rope_theta": draft.rope_theta,
        "rope_scaling": None if draft.rope_scaling is None else {
            "rope_type": "llama3", **dataclasses.asdict(draft.rope_scaling)},
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": True,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "bias": fc_bias,
    }
    if draft.attention_bias:
        config["qkv_bias"] = True
    if draft.bos_token_id is not None:
        config["bos_token_id"] = draft.bos_token_id
    if draft.eos_token_ids:
        config["eos_token_id"] = (draft.eos_token_ids[0] if len(draft.eos_token_ids) == 1
                                  else list(draft.eos_token_ids))
    if pad_token_id is not None:
        config["pad_token_id"] = pad_token_id
    config["flatspec"] = {"format_version": FORMAT_VERSION, "target_arch": json.loads(target.to_json()),
                          "target_vocab_hash": target_vocab_hash, "draft_arch": json.loads(draft.to_json()),
                          "fc_bias": fc_bias, **(extra or {})}
    return config


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """What an EAGLE head directory says about the head, checked against the target."""

    num_layers: int
    fc_bias: bool
    qkv_bias: bool
    flatspec: dict[str, Any] | None
    """Our export block (target identity), or None for a head from elsewhere."""
    draft_vocab: np.ndarray | None = None
    """[N] ascending token ids a head trained on a reduced vocabulary proposes from (our block's
    ``draft_vocab``); None: the whole vocabulary."""
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The head's own ``rope_theta``, ``rope_scaling`` and ``rms_norm_eps`` (the reference's defaults
    10000, none and 1e-6 where absent): the reference trains and runs a head with these, not the
    target's."""

    def arch(self, target: ArchSpec) -> ArchSpec:
        """The imported head's architecture: the target's layer shapes with the head's own values."""
        return dataclasses.replace(draft_arch(target, self.num_layers), **self.values)


def read_head_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: not found (an EAGLE head directory has config.json and "
                           f"{SAFETENSORS_NAME} or {TORCH_NAME})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{path}: cannot read the head config ({err})") from err
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: not a JSON object")
    return config


def _int_field(config: Mapping[str, Any], key: str, source: str, default: Any = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise WeightsError(f"{source}: field {key} must be an integer >= 1, got {value!r}")
    return value


def _bool_field(config: Mapping[str, Any], key: str, source: str, default: bool) -> bool:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise WeightsError(f"{source}: field {key} must be true or false, got {value!r}")
    return value


def check_head_config(config: Mapping[str, Any], target: ArchSpec, source: str,
                      target_vocab_hash: str | None = None) -> HeadSpec:
    """Checks that a head's config.json describes a head for ``target``.

    Shape fields (hidden_size, heads, KV heads, head_dim, intermediate_size, vocab_size) and
    ``qkv_bias`` must equal the target's; RoPE and norm settings are the head's own (the
    reference runs a head with its config's, defaults included), logged where they differ from
    the target's. A config with our ``flatspec`` block must also
    name exactly this target and, given ``target_vocab_hash``, its tokenizer vocabulary.

    Raises:
      CheckpointMismatchError: naming the field that does not match the target.
      WeightsError: for a malformed field.
    """
    hidden = _int_field(config, "hidden_size", source)
    heads = _int_field(config, "num_attention_heads", source)
    values = {
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": _int_field(config, "num_key_value_heads", source, heads),
        "head_dim": _int_field(config, "head_dim", source, hidden // heads if hidden % heads == 0 else None),
        "intermediate_size": _int_field(config, "intermediate_size", source),
        "vocab_size": _int_field(config, "vocab_size", source),
    }
    for field, attr in _SHAPE_FIELDS:
        if values[field] != getattr(target, attr):
            raise CheckpointMismatchError(f"{source}: field {field} = {values[field]} does not match the target's "
                                          f"{getattr(target, attr)}; this head was made for another model")
    qkv_bias = _bool_field(config, "qkv_bias", source, False)
    if qkv_bias != target.attention_bias:
        raise CheckpointMismatchError(
            f"{source}: field qkv_bias = {qkv_bias} but the target ({target.architecture}) "
            f"{'has' if target.attention_bias else 'has no'} q/k/v biases; this head was made for another model")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise WeightsError(f"{source}: field hidden_act is {act!r}; only 'silu' is supported")
    values = value_settings(config, source, rms_norm_eps=REFERENCE_RMS_NORM_EPS,
                            max_positions=_int_field(config, "max_position_embeddings", source,
                                                     target.max_position_embeddings))
    _log_value_differences(values, target, source)
    flatspec = config.get("flatspec")
    draft_vocab = None
    if flatspec is not None:
        _check_flatspec_block(flatspec, target, target_vocab_hash, source)
        draft_vocab = _draft_vocab_field(flatspec, target, source)
    return HeadSpec(num_layers=_int_field(config, "num_hidden_layers", source),
                    fc_bias=_bool_field(config, "bias", source, True),  # the reference's default
                    qkv_bias=qkv_bias, flatspec=flatspec, draft_vocab=draft_vocab, values=values)


def _log_value_differences(values: Mapping[str, Any], target: ArchSpec, source: str) -> None:
    """Says where the head's RoPE/norm settings (kept: they do not change shapes) are not the target's."""
    for field, value in values.items():
        if value != getattr(target, field):
            log.info("%s: the head keeps its own %s = %s (the target has %s), as the reference runs it",
                     source, field, value, getattr(target, field))


def _check_flatspec_block(block: Any, target: ArchSpec, target_vocab_hash: str | None, source: str) -> None:
    if not isinstance(block, dict) or "target_arch" not in block:
        raise WeightsError(f"{source}: field flatspec is not a flatspec export block")
    saved = ArchSpec.from_json(json.dumps(block["target_arch"]), f"{source} (flatspec.target_arch)")
    if saved != target:
        diffs = [f"{k}: head made for {getattr(saved, k)!r}, target has {getattr(target, k)!r}"
                 for k in target.__dataclass_fields__ if getattr(saved, k) != getattr(target, k)]
        raise CheckpointMismatchError(f"{source}: flatspec.target_arch: the head was trained for another target "
                                      f"model ({'; '.join(diffs)})")
    if target_vocab_hash is not None and block.get("target_vocab_hash") != target_vocab_hash:
        raise CheckpointMismatchError(f"{source}: flatspec.target_vocab_hash: the head was trained with another "
                                      "tokenizer vocabulary (vocab hash differs)")


def _draft_vocab_field(block: Mapping[str, Any], target: ArchSpec, source: str) -> np.ndarray | None:
    ids = block.get("draft_vocab")
    if ids is None:
        return None
    if (not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
            or not all(0 <= i < target.vocab_size for i in ids) or any(a >= b for a, b in zip(ids, ids[1:]))):
        raise WeightsError(f"{source}: field flatspec.draft_vocab must be a non-empty ascending list of distinct "
                           f"token ids below the target's vocabulary size {target.vocab_size}")
    return np.asarray(ids, np.int32)


# ----------------------------------------------------------------------------------------------
# Tensor files
# ----------------------------------------------------------------------------------------------


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def _torch():
    try:
        import torch
    except ImportError as err:  # pragma: no cover - torch is a dependency of the test environment
        raise WeightsError(f"reading or writing {TORCH_NAME} needs PyTorch ({err})") from err
    return torch


def _to_torch(array: np.ndarray):
    torch = _torch()
    array = np.ascontiguousarray(array)
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def _from_torch(tensor: Any, name: str, source: str) -> np.ndarray:
    torch = _torch()
    if not isinstance(tensor, torch.Tensor):
        raise WeightsError(f"{source}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def read_state_dict(directory: Path) -> tuple[dict[str, np.ndarray], str]:
    """The head's tensors and the file they came from: ``model.safetensors`` if present (no
    PyTorch needed), else ``pytorch_model.bin`` (loaded with ``weights_only=True``).

    Raises:
      WeightsError: naming the directory when it has neither file, or the file when it is unreadable.
    """
    directory = Path(directory)
    safetensors = directory / SAFETENSORS_NAME
    if safetensors.is_file():
        handle = SafetensorsFile(safetensors)
        try:
            return {name: handle.read(name) for name in handle.tensors}, str(safetensors)
        finally:
            handle.close()
    binary = directory / TORCH_NAME
    if binary.is_file():
        torch = _torch()
        try:
            state = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as err:
            raise WeightsError(f"{binary}: cannot load ({type(err).__name__}: {err})") from err
        if not isinstance(state, Mapping):
            raise WeightsError(f"{binary}: not a state dict (got {type(state).__name__})")
        return {str(k): _from_torch(v, str(k), str(binary)) for k, v in state.items()}, str(binary)
    raise WeightsError(f"{directory}: no {SAFETENSORS_NAME} or {TORCH_NAME} (not an EAGLE head directory)")


def cast(array: np.ndarray, dtype: str) -> np.ndarray:
    return np.asarray(array).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))


def write_head_dir(out: Path, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> Path:
    """Writes config.json, model.safetensors and pytorch_model.bin into ``out``, atomically.

    PyTorch is a test-only dependency: without it ``pytorch_model.bin`` is skipped with a
    warning (SGLang, vLLM and EAGLE-2/3 read ``model.safetensors``; EAGLE-1 needs the .bin).

    Everything is written into a temporary directory beside ``out`` and fsynced, then renamed
    to ``out``. An existing ``out`` is first renamed aside and deleted after the swap, so
    ``out`` holds either the old or the new complete head, never a mixture; an error puts the
    old one back. Only a process killed between the two renames leaves no ``out``: the old head
    is then in ``.<name>.*.old/<name>`` beside it, and the next export to ``out`` puts it back
    first. What killed exports left beside ``out`` is cleared first: their partial heads
    (``.<name>.*.tmp``) and heads set aside whose replacement is in place.

    Raises:
      FileExistsError: ``out`` is a file, a directory holding anything but an exported head's
        files (a run directory, say), or a head that flatspec did not export (its config.json has
        no ``flatspec`` block: a published head, say): it is never replaced.
    """
    out = Path(out).absolute()
    _recover_from_killed_exports(out)
    if out.exists():
        _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ordered = {k: tensors[k] for k in sorted(tensors, key=_sort_key_safe)}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        with open(tmp / SAFETENSORS_NAME, "wb") as f:
            write_safetensors(f, {k: (v.dtype, v.shape) for k, v in ordered.items()}, ordered.items(),
                              {"format": "pt"})
        written = [CONFIG_NAME, SAFETENSORS_NAME]
        if not torch_available():
            log.warning("PyTorch is not installed: %s not written to %s (pip install torch to write it)",
                        TORCH_NAME, out)
        else:
            _torch().save({k: _to_torch(v) for k, v in ordered.items()}, tmp / TORCH_NAME)
            written.append(TORCH_NAME)
        for name in written:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.rename(out, old / out.name)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / out.name).exists() and not out.exists():
            os.rename(old / out.name, out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out.parent)
    return out


def _check_replaceable(out: Path) -> None:
    """Raises FileExistsError unless ``out`` is an empty directory or one of our earlier exports."""
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    if held is None or not set(held) <= {CONFIG_NAME, SAFETENSORS_NAME, TORCH_NAME}:
        what = "a file" if held is None else f"a directory holding {', '.join(held[:5])}" + (
            ", ..." if len(held) > 5 else "")
    elif held and not _exported_by_us(out / CONFIG_NAME):
        what = "an EAGLE head that flatspec did not export (its config.json has no 'flatspec' block)"
    else:
        return
    raise FileExistsError(f"{out} is {what}, not an exported head: an export replaces only an earlier "
                          "export or an empty directory; name another output directory")


def _leftovers(out: Path, suffix: str) -> list[Path]:
    """The directories ``tempfile.mkdtemp(prefix=f".{out.name}.", suffix=suffix)`` makes beside ``out``: its
    random part is 8 characters of [a-z0-9_], so another output's (``out.name`` + ".v2", say) never match."""
    pattern = re.escape(f".{out.name}.") + r"[a-z0-9_]{8}" + re.escape(suffix)
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir() if re.fullmatch(pattern, p.name) and p.is_dir())


def _recover_from_killed_exports(out: Path) -> None:
    """Clears what exports to ``out`` that were killed left beside it: a partial head is deleted; a head set
    aside is put back as ``out`` when ``out`` is missing (killed between the renames), else deleted (its
    replacement is in place)."""
    for leftover in _leftovers(out, ".tmp"):
        log.info("removing %s, the partial head of an export that was killed", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    for aside in _leftovers(out, ".old"):
        held = [p.name for p in aside.iterdir()]
        if held not in ([], [out.name]):
            continue  # not what an export sets aside: leave it
        if held and not out.exists():
            log.warning("putting back %s, which an export killed before writing %s had set aside", aside / out.name,
                        out)
            os.rename(aside / out.name, out)
        log.info("removing %s, left by an export that was killed", aside)
        shutil.rmtree(aside, ignore_errors=True)


def _exported_by_us(config_path: Path) -> bool:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):  # missing (a cut export's weights alone), unreadable or not JSON
        return False
    return isinstance(config, dict) and isinstance(config.get("flatspec"), dict)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
