"""Checkpoint readers: a model on disk -> an ArchSpec and HF-named numpy tensors, one at a time.

``open_checkpoint(path)`` reads an HF safetensors directory or a llama.cpp .gguf file; see
:class:`CheckpointReader` for the names and orientation of the tensors. No jax here: placing
the tensors on devices is ``to_nnx``'s job.
"""

from flatspec_jax.weights.arch import ArchSpec, RopeScaling
from flatspec_jax.weights.errors import WeightsError
from flatspec_jax.weights.reader import CheckpointReader, open_checkpoint

__all__ = ["ArchSpec", "CheckpointReader", "RopeScaling", "WeightsError", "open_checkpoint"]
