"""Stage fingerprints follow the bytes of the data and model files, not their paths or mtimes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from flatspec_jax import fingerprint
from flatspec_jax.config import DataConfig
from flatspec_jax.data.prepare import prepare_samples, tokens_fingerprint
from flatspec_jax.data.sources import iter_conversations
from flatspec_jax.data.conversations import SkipReport
from flatspec_jax.data.tokenizer import load_tokenizer
from tiny_target import save_tiny_llama


def conversation(rid: str | None, reply: str) -> dict:
    record = {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": reply}]}
    return record if rid is None else {"id": rid, **record}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_small_files_are_identified_by_their_sha256_and_names(tmp_path):
    a = tmp_path / "x" / "data.jsonl"
    a.parent.mkdir()
    a.write_bytes(b"0123456789")
    assert fingerprint.file_identity(a) == hashlib.sha256(b"0123456789").hexdigest() == fingerprint.file_sha256(a)
    b = tmp_path / "y" / "data.jsonl"
    b.parent.mkdir()
    shutil.copy(a, b)
    assert fingerprint.files_identity([a]) == fingerprint.files_identity([b]), "a moved copy is the same input"
    renamed = tmp_path / "other.jsonl"
    shutil.copy(a, renamed)
    assert fingerprint.files_identity([renamed]) != fingerprint.files_identity([a])
    a.write_bytes(b"0123456788")  # same size, one byte changed in place
    assert fingerprint.file_identity(a) != fingerprint.file_identity(b)


def test_large_files_are_identified_by_size_and_both_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "FULL_HASH_BYTES", 64)
    monkeypatch.setattr(fingerprint, "EDGE_BYTES", 16)
    path = tmp_path / "weights.safetensors"
    original = bytes(range(100))
    path.write_bytes(original)
    identity = fingerprint.file_identity(path)
    assert identity != hashlib.sha256(original).hexdigest()
    for changed in (b"\xff" + original[1:], original[:-1] + b"\xff", original + b"\x00"):
        path.write_bytes(changed)
        assert fingerprint.file_identity(path) != identity, changed[-3:]


def test_tokens_fingerprint_follows_file_contents_not_paths(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "a" / "train.jsonl", [conversation("c0", "first reply")])
    moved_model = tmp_path / "moved_model"
    shutil.copytree(model_dir, moved_model)
    moved_data = tmp_path / "b" / "train.jsonl"
    moved_data.parent.mkdir()
    shutil.copy(data, moved_data)
    base = tokens_fingerprint(DataConfig(source=str(data)), str(model_dir), tmp_path)
    assert tokens_fingerprint(DataConfig(source=str(moved_data)), str(moved_model), tmp_path) == base

    write_jsonl(moved_data, [conversation("c0", "edited reply")])
    assert tokens_fingerprint(DataConfig(source=str(moved_data)), str(model_dir), tmp_path) != base
    (moved_model / "tokenizer_config.json").write_text((model_dir / "tokenizer_config.json").read_text() + " ")
    assert tokens_fingerprint(DataConfig(source=str(data)), str(moved_model), tmp_path) != base


def test_a_model_directory_is_identified_with_its_chat_template_files(tmp_path, model_dir):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    (model / "README.md").write_text("not read by any loader")
    base = fingerprint.model_identity(model)
    (model / "README.md").write_text("edited")
    assert fingerprint.model_identity(model) == base
    for template in (model / "chat_template.jinja", model / "additional_chat_templates" / "tool_use.jinja"):
        template.parent.mkdir(exist_ok=True)
        template.write_text("{{ messages[0]['content'] }}")
        changed = fingerprint.model_identity(model)
        assert changed != base
        template.write_text("{{ messages[-1]['content'] }}")
        assert fingerprint.model_identity(model) != changed
        base = fingerprint.model_identity(model)


def test_a_source_globbing_subdirectories_is_identified_with_their_paths(tmp_path):
    first = write_jsonl(tmp_path / "data" / "a" / "train.jsonl", [conversation("c0", "first")])
    second = write_jsonl(tmp_path / "data" / "b" / "train.jsonl", [conversation("c1", "second")])
    base = fingerprint.source_identity(str(tmp_path / "data" / "**" / "*.jsonl"))
    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    assert fingerprint.source_identity(str(tmp_path / "moved" / "**" / "*.jsonl")) == base
    texts = first.read_text(), second.read_text()
    first.write_text(texts[1])  # the same files and names, read in the other order
    second.write_text(texts[0])
    assert fingerprint.source_identity(str(tmp_path / "data" / "**" / "*.jsonl")) != base
    assert fingerprint.source_identity(str(first)) == fingerprint.files_identity([first])  # one file: its name


def test_an_edited_source_is_tokenized_again(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", [conversation("c0", "short")])
    tokenizer = load_tokenizer(model_dir)
    first = prepare_samples(DataConfig(source=str(data)), str(model_dir), tokenizer, tmp_path)
    write_jsonl(data, [conversation("c0", "a much longer reply than before, with many more tokens in it")])
    second = prepare_samples(DataConfig(source=str(data)), str(model_dir), tokenizer, tmp_path)
    assert second.fingerprint != first.fingerprint
    assert len(second.tokens) > len(first.tokens)


def test_files_of_one_name_in_different_directories_get_distinct_fallback_ids(tmp_path):
    write_jsonl(tmp_path / "a" / "train.jsonl", [conversation(None, "one")])
    write_jsonl(tmp_path / "b" / "train.jsonl", [conversation(None, "two")])
    ids = [c.id for c in iter_conversations(str(tmp_path / "**" / "*.jsonl"), SkipReport())]
    assert ids == ["a/train.jsonl:0", "b/train.jsonl:0"]
    single = [c.id for c in iter_conversations(str(tmp_path / "a" / "train.jsonl"), SkipReport())]
    assert single == ["train.jsonl:0"]


def test_repeated_sample_ids_are_refused_before_scoring(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", [conversation("same", "one"), conversation("other", "two"),
                                                  conversation("same", "three")])
    with pytest.raises(ValueError, match=r"train\.jsonl: samples 0 and 2 have the same id 'same'"):
        prepare_samples(DataConfig(source=str(data)), str(model_dir), load_tokenizer(model_dir), tmp_path)


def test_a_source_without_one_usable_conversation_names_the_records_reason(tmp_path, model_dir):
    """Not "no sample with an assistant token (data.limit, data.max_length)": the settings are not at fault."""
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"id": "a", "foo": 1}, {"id": "b", "foo": 2}]))
    with pytest.raises(ValueError, match=rf"{data}: no usable conversation: 2 records read, 0 conversations kept, "
                                         r"2 skipped \(2 missing_turns"):
        prepare_samples(DataConfig(source=str(data)), str(model_dir), load_tokenizer(model_dir), tmp_path)
