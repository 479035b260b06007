"""Prompt files for eval and generate: MT-bench and JSONL, with errors naming the file and line."""

import json
import logging

import pytest

from flatspec_jax.data.prompts import load_prompts
from flatspec_jax.data.sources import DataFormatError


def write_jsonl(tmp_path, *records) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return str(path)


def test_mtbench_has_80_two_turn_questions():
    prompts = load_prompts("mtbench", turns=2)
    assert len(prompts) == 80
    assert all(len(p.turns) == 2 and all(p.turns) for p in prompts)
    assert [len(p.turns) for p in load_prompts("mtbench", limit=3)] == [1, 1, 1]


def test_jsonl_prompts_keep_ids_categories_and_file_order(tmp_path, caplog):
    path = write_jsonl(tmp_path, {"prompt": "first", "id": "a", "category": "x"}, "",
                       {"turns": ["second", "follow-up"], "question_id": 7})
    with caplog.at_level(logging.WARNING):
        prompts = load_prompts(path, turns=2)
    assert "1 of 2 prompts have fewer than the 2 turns asked for (eval.turns)" in caplog.text
    assert [(p.id, p.category, p.turns) for p in prompts] == [("a", "x", ("first",)),
                                                               ("7", "", ("second", "follow-up"))]


@pytest.mark.parametrize("bad", ['["a list"]', '"a string"', json.dumps({"turns": "not a list"}),
                                 json.dumps({"turns": []}), json.dumps({"prompt": ""}), json.dumps({"text": "x"}),
                                 json.dumps({"turns": ["ok", 3]})])
def test_a_record_without_usable_turns_names_file_and_line(tmp_path, bad):
    path = write_jsonl(tmp_path, {"prompt": "fine"}, bad)
    with pytest.raises(ValueError, match=rf"{path}:2: expected an object with a non-empty 'prompt'"):
        load_prompts(path)


def test_invalid_json_and_empty_files_are_named(tmp_path):
    path = write_jsonl(tmp_path, "{not json")
    with pytest.raises(ValueError, match=rf"{path}:1: not valid JSON"):
        load_prompts(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=rf"{empty}: no prompts"):
        load_prompts(str(empty))
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(DataFormatError, match=rf"{missing}: cannot read the prompts"):
        load_prompts(str(missing))
    binary = tmp_path / "scores.parquet"
    binary.write_bytes(b"PAR1\xba\xff\x00\n")
    with pytest.raises(DataFormatError, match=rf"{binary}: not a UTF-8 text file"):
        load_prompts(str(binary))


def test_a_byte_order_mark_is_dropped_and_a_lone_surrogate_names_the_line(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "hello"}).encode() + b"\n")
    assert [p.turns for p in load_prompts(str(path))] == [("hello",)]
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + '{"prompt": "x \\ud800"}\n')
    with pytest.raises(DataFormatError, match=rf"{path}:2: a prompt holds a lone surrogate"):
        load_prompts(str(path))


def test_a_repeated_prompt_id_names_both_lines(tmp_path):
    path = write_jsonl(tmp_path, {"prompt": "one", "id": "q1"}, {"prompt": "two", "id": "q2"},
                       {"prompt": "three", "question_id": "q1"})
    with pytest.raises(DataFormatError, match=rf"{path}:3: prompt id 'q1' repeats line 1's"):
        load_prompts(path)
