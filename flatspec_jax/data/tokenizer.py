"""The target model's tokenizer, from a HF directory or a GGUF file (GGUF conversions cached on disk).

A GGUF file's tokenizer is built by transformers' own GGUF converter
(``transformers.integrations.gguf.gguf_tokenizer_mapping``), fed the file's ``tokenizer.*``
metadata as read by :class:`~flatspec_jax.weights.gguf_file.GGUFFile`: transformers'
``AutoTokenizer(gguf_file=...)`` route reads that metadata with a reader that imports torch,
which is a test-only dependency here.
``tests/test_chat.py`` checks the result against that route token for token. Building it
converts the whole vocabulary and merge list (~1 s for SmolLM2's 49k tokens), a large part
of the wall time of short runs. The converted tokenizer is therefore saved with ``save_pretrained`` under
``<cache root>/tokenizers/<key>/`` (cache root: ``$FLATSPEC_CACHE_DIR`` or
``~/.cache/flatspec_jax``) and reloaded from there in ~0.3 s. The key is cheap to compute
and changes whenever the file or the converter could: the file's stem, size and mtime, a
sha256 of its first and last 4 MiB (the tokenizer lives in the leading metadata), and the
transformers version. Entries are written to a temporary directory beside the final one
and renamed into place, so readers never see a half-written entry and concurrent
processes building the same entry do not clash. An entry that fails to load or to match
its recorded vocabulary size and chat template is logged, removed and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import transformers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from flatspec_jax import assets
from flatspec_jax.runtime import cache_root
from flatspec_jax.weights.errors import WeightsError
from flatspec_jax.weights.gguf_file import GGUFFile

log = logging.getLogger(__name__)

_EDGE_BYTES = 4 << 20
_MARKER = "flatspec_tokenizer.json"  # written last inside an entry: records what the entry must match


def default_model_path() -> str:
    """Path of the embedded SmolLM2-135M-Instruct GGUF (raises ``assets.AssetError`` naming the install command)."""
    return str(assets.smollm2_gguf())


def load_tokenizer(model_path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a HF model directory or a ``.gguf`` file (the GGUF one through the on-disk cache).

    Never touches the network: everything is loaded with ``local_files_only``.
    """
    path = Path(model_path).expanduser()
    if path.is_dir():
        # Imported here: AutoTokenizer pulls in transformers' model configs, and with them torch
        # where it is installed (~2 s), which a GGUF target never needs.
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:  # no tokenizer files, or ones transformers cannot convert
            reason = " ".join(str(err).split())[:300] or type(err).__name__
            raise WeightsError(f"{path}: no usable tokenizer (tokenizer.json, or tokenizer_config.json with its "
                               f"vocabulary files): {reason}") from err
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path)
    raise FileNotFoundError(f"model path {str(model_path)!r} is neither a HF model directory nor a .gguf file")


def gguf_cache_dir(path: str | Path) -> Path:
    """Where the converted tokenizer of the GGUF file ``path`` is (or would be) cached."""
    path = Path(path)
    stat = path.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(_EDGE_BYTES))
        if stat.st_size > _EDGE_BYTES:
            handle.seek(max(_EDGE_BYTES, stat.st_size - _EDGE_BYTES))
            digest.update(handle.read())
    return cache_root() / "tokenizers" / f"{path.stem}-{digest.hexdigest()[:16]}"


def _load_gguf(path: Path) -> PreTrainedTokenizerBase:
    entry = gguf_cache_dir(path)
    cached = _load_entry(entry, path)
    if cached is not None:
        return cached
    start = time.perf_counter()
    tokenizer = build_gguf_tokenizer(path)
    log.info("built the tokenizer of %s in %.1f s; caching it in %s", path, time.perf_counter() - start, entry)
    try:
        _save_entry(tokenizer, entry, path)
    except OSError as err:  # a read-only or full cache disk costs time, not correctness
        log.warning("could not cache the tokenizer of %s in %s: %s", path, entry, err)
    return tokenizer


def build_gguf_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer a GGUF file describes, without torch (uncached; ``load_tokenizer`` caches it).

    Mirrors transformers' ``get_gguf_tokenizer`` (which reads the metadata through torch):
    the ``tokenizer.*`` fields are renamed by ``GGUF_TOKENIZER_MAPPING`` into the converter's
    input and the tokenizer config (chat template, BOS/EOS flags), and the special tokens are
    spelled from their ids.
    """
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                           convert_gguf_tokenizer)
    except ImportError:  # older transformers (5.17, a GPU image's) keeps both here
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    metadata = {key: value for key, value in GGUFFile(path).fields.items()
                if key.startswith("tokenizer.") or key == "general.architecture"}
    if "general.architecture" not in metadata or "tokenizer.ggml.tokens" not in metadata:
        raise WeightsError(f"{path}: GGUF metadata has no general.architecture or tokenizer.ggml.tokens")
    grouped = {group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                       if f"tokenizer.{key}" in metadata}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary whose file does not say otherwise.
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokens[token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    # Older converters (transformers 5.17) also return special tokens in ``extra``; the ids the GGUF
    # metadata names win.
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{**extra, **tokenizer_config})


def _fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict[str, object]:
    """What a cached entry must reproduce: vocabulary size and chat template."""
    template = tokenizer.chat_template or ""
    return {"vocab_size": len(tokenizer),
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()}


def _load_entry(entry: Path, source: Path) -> PreTrainedTokenizerBase | None:
    """The cached tokenizer, or None when there is no entry or it is broken (then it is removed)."""
    if not entry.exists():
        return None
    try:
        expected = json.loads((entry / _MARKER).read_text())
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(entry), local_files_only=True)
        found = _fingerprint(tokenizer)
        if any(expected.get(key) != value for key, value in found.items()):
            raise ValueError(f"entry holds {found}, its marker says {expected}")
    except Exception as err:  # noqa: BLE001 -- whatever is wrong with an entry, the cure is a rebuild
        log.warning("tokenizer cache entry %s is broken (%s: %s); rebuilding it from %s",
                    entry, type(err).__name__, err, source)
        _remove(entry)
        return None
    log.debug("loaded the tokenizer of %s from the cache %s", source, entry)
    return tokenizer


def _save_entry(tokenizer: PreTrainedTokenizerBase, entry: Path, source: Path) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        marker = {**_fingerprint(tokenizer), "source": str(source), "transformers": transformers.__version__}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        try:
            os.replace(tmp, entry)  # atomic; fails when another process has put its entry in place first
        except OSError:
            if not (entry / _MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove(entry: Path) -> None:
    """Moves ``entry`` aside (atomically, so no reader sees it half deleted), then deletes it."""
    aside = entry.with_name(f".{entry.name}.broken-{os.getpid()}-{time.time_ns()}")
    try:
        os.replace(entry, aside)
    except OSError:
        return  # already gone (another process rebuilt it)
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)
