"""Opening a checkpoint, and the interface of every reader: an ArchSpec and tensors by HF name.

``open_checkpoint`` picks the reader from the path: an HF directory
(``safetensors_reader``) or a llama.cpp .gguf file (``gguf_reader``).
"""

from __future__ import annotations

import abc
from pathlib import Path
from types import TracebackType

import numpy as np

from flatspec_jax.weights.arch import ArchSpec
from flatspec_jax.weights.errors import WeightsError

__all__ = ["CheckpointReader", "open_checkpoint"]

_GGUF_MAGIC = b"GGUF"


class CheckpointReader(abc.ABC):
    """A checkpoint on disk, read one tensor at a time.

    Tensor names are Hugging Face Llama-family keys (``model.embed_tokens.weight``,
    ``model.layers.{i}.self_attn.q_proj.weight``, ..., ``model.norm.weight``,
    ``lm_head.weight``, absent when ``arch.tie_word_embeddings``). Arrays are in HF
    orientation: linear weights ``[out, in]``, norms and biases ``[n]``.

    Attributes:
      arch: the checkpoint's architecture.
      source: the file or directory read, as named in errors.
    """

    arch: ArchSpec
    source: str

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """Every tensor name, sorted."""

    @abc.abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's HF shape, without reading its data."""

    @abc.abstractmethod
    def get(self, name: str) -> np.ndarray:
        """A fresh host copy of one tensor (HF orientation); peak memory is about that tensor.

        Raises:
          WeightsError: naming the tensor and ``source`` when there is no such tensor.
        """

    def close(self) -> None:
        """Releases open files; the reader is unusable afterwards."""

    def __contains__(self, name: object) -> bool:
        return name in self.keys()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _missing(self, name: str) -> WeightsError:
        """The error for a tensor this checkpoint lacks."""
        return WeightsError(f"{self.source}: no tensor {name!r} in this checkpoint "
                            f"({len(self.keys())} tensors, e.g. {self.keys()[:3]})")


def open_checkpoint(path: str | Path, *, cache_dir: str | Path | None = None) -> CheckpointReader:
    """Opens a checkpoint for reading one tensor at a time (use as a context manager).

    Args:
      path: an HF model directory (``config.json`` + ``model.safetensors`` or a sharded
        ``model.safetensors.index.json``), or a llama.cpp ``.gguf`` file.
      cache_dir: where dequantized GGUF tensors are cached (see ``gguf_reader``); default
        ``$FLATSPEC_CACHE_DIR/gguf`` or ``~/.cache/flatspec_jax/gguf``. Unused for HF directories.

    Raises:
      WeightsError: naming the path, field or tensor at fault.
    """
    # Imported here because both reader modules subclass CheckpointReader from this one.
    from flatspec_jax.weights.gguf_reader import open_gguf
    from flatspec_jax.weights.safetensors_reader import SafetensorsCheckpoint

    path = Path(path)
    if path.is_dir():
        return SafetensorsCheckpoint(path)
    if not path.exists():
        raise _not_found(path)
    if path.suffix.lower() == ".gguf" or _starts_with(path, _GGUF_MAGIC):
        return open_gguf(path, cache_dir)
    raise WeightsError(f"{path}: not a checkpoint (expected an HF model directory or a .gguf file)")


MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".model", ".gguf", ".txt", ".jinja", ".tiktoken", ".v3")
"""Files of an HF model directory that the weights and tokenizer loaders read (``chat_template.jinja``
overrides the template in ``tokenizer_config.json``; ``tokenizer.model.v3`` is Mistral's)."""
CHAT_TEMPLATES_DIR = "additional_chat_templates"
"""Named chat templates that transformers keeps in a subdirectory."""


def model_files(path: str | Path) -> list[Path]:
    """The files a model is loaded from: a .gguf file itself, or the config, weights and tokenizer
    files of an HF directory (what its identity in stage fingerprints covers).

    Raises:
      WeightsError: when ``path`` does not exist.
    """
    path = Path(path)
    if path.is_dir():
        files = [*path.iterdir(), *(path / CHAT_TEMPLATES_DIR).glob("*")]
        return sorted(p for p in files if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES)
    if not path.exists():
        raise _not_found(path)
    return [path]


def _not_found(path: Path) -> WeightsError:
    return WeightsError(f"{path}: checkpoint not found (expected an HF model directory or a .gguf file)")


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False
