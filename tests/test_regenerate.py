"""Target-generated training data (``data.responses: target``, ``flatspec regenerate``).

On a tiny random Llama with SmolLM2's tokenizer and the first ShareGPT conversations: each kept
conversation holds its source's first user turns answered by the target's greedy replies (equal
to decoding each prompt alone), in source order, with too-long prompts dropped and counted; an
interrupted run resumes at the first missing part and ends byte-identical to an uninterrupted
run; current replies are not decoded again and changed settings are; the tokenized samples of
the run are built from the replies.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from flatspec_jax import cli
from flatspec_jax.config import ConfigError, load_config
from flatspec_jax.data import regenerate as regen
from flatspec_jax.data.chat import render_prompt
from flatspec_jax.data.sources import load_conversations
from flatspec_jax.runtime import Preempted
from flatspec_jax.stages.common import RunContext
from tiny_target import save_tiny_llama

LIMIT, MAX_LENGTH, MAX_NEW = 12, 96, 6


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def make_config(tiny_dir: Path, run_dir: Path, *extra: str):
    return load_config(None, [
        f"run_dir={run_dir}", f"model.path={tiny_dir}", "mesh.data=1", f"data.limit={LIMIT}",
        f"data.max_length={MAX_LENGTH}", "data.responses=target", "regenerate.turns=2",
        f"regenerate.max_new_tokens={MAX_NEW}", "regenerate.batch_size=3", "regenerate.flush_every=1", *extra])


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in regen.responses_path(run_dir).read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    """An uninterrupted run: (config, context, meta, file bytes)."""
    cfg = make_config(tiny_dir, tmp_path_factory.mktemp("reference"))
    ctx = RunContext(cfg)
    meta = ctx.responses
    return cfg, ctx, meta, regen.responses_path(cfg.run_dir).read_bytes()


def test_replies_answer_the_first_user_turns_in_source_order(reference):
    cfg, ctx, meta, _ = reference
    records = read_records(Path(cfg.run_dir))
    sources = {c.id: c for c in load_conversations("sharegpt", LIMIT)[0]}
    ids = [r["id"] for r in records]
    assert ids == [i for i in sources if i in set(ids)], "records are not in source order"
    assert meta["conversations"] == len(records) > 0
    for record in records:
        users = [m.content for m in sources[record["id"]].messages if m.role == "user"][:2]
        roles = [m["role"] for m in record["messages"] if m["role"] != "system"]
        asked = [m["content"] for m in record["messages"] if m["role"] == "user"]
        assert asked == users[:len(asked)], record["id"]
        assert roles == ["user", "assistant"] * len(asked), record["id"]
        assert all(m["content"] for m in record["messages"] if m["role"] == "assistant"), record["id"]


def test_too_long_prompts_are_dropped_and_counted(reference):
    cfg, ctx, meta, _ = reference
    too_long = 0
    for conv in load_conversations("sharegpt", LIMIT)[0]:
        first = [m.as_dict() for m in conv.messages[:[m.role for m in conv.messages].index("user") + 1]]
        too_long += len(render_prompt(ctx.tokenizer, first)) >= MAX_LENGTH
    assert too_long > 0, "the test data should hold a prompt longer than data.max_length"
    assert meta["dropped"][regen.PROMPT_TOO_LONG] == too_long
    assert meta["conversations"] + sum(meta["dropped"].values()) == LIMIT


def test_first_reply_equals_decoding_the_prompt_alone(reference):
    cfg, ctx, _, _ = reference
    worker = regen._Regenerator(cfg, ctx.target, ctx.tokenizer, ctx.eos_ids(), ctx.pad_id())
    for record in read_records(Path(cfg.run_dir))[:4]:
        first_user = next(i for i, m in enumerate(record["messages"]) if m["role"] == "user")
        prompt = render_prompt(ctx.tokenizer, record["messages"][:first_user + 1])
        alone = worker.decoder.run([prompt], jax.random.key(0))
        assert worker.decoder.text(ctx.tokenizer, alone.tokens[0]) == record["messages"][first_user + 1]["content"]


def test_interrupted_run_resumes_and_equals_uninterrupted(reference, tiny_dir, tmp_path, monkeypatch):
    cfg_ref, ref_ctx, ref_meta, ref_bytes = reference
    cfg = make_config(tiny_dir, tmp_path / "run")
    ctx = RunContext(cfg)
    ctx.target = ref_ctx.target  # the same weights; skip loading them again
    calls = []
    original = regen._Regenerator.batch

    def failing_batch(self, sources, key):
        calls.append(sources[0].id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, sources, key)

    monkeypatch.setattr(regen._Regenerator, "batch", failing_batch)
    with pytest.raises(KeyboardInterrupt):
        regen.regenerate(cfg, ctx.target, ctx.tokenizer, ctx.eos_ids(), ctx.pad_id(), ctx.model_path)
    parts = sorted((tmp_path / "run" / (regen.RESPONSES_FILE + ".parts")).glob("part-*.jsonl"))
    assert [p.name for p in parts] == ["part-000000.jsonl", "part-000001.jsonl"]
    calls.clear()
    meta = regen.regenerate(cfg, ctx.target, ctx.tokenizer, ctx.eos_ids(), ctx.pad_id(), ctx.model_path)
    num_batches = -(-(LIMIT - ref_meta["dropped"][regen.PROMPT_TOO_LONG]) // 3)
    assert len(calls) == num_batches - 2, "finished parts were decoded again"
    assert regen.responses_path(cfg.run_dir).read_bytes() == ref_bytes
    assert meta == ref_meta
    assert not (tmp_path / "run" / (regen.RESPONSES_FILE + ".parts")).exists()


def test_a_preempted_run_stops_between_parts_and_resumes_to_the_same_replies(reference, tiny_dir, tmp_path,
                                                                          monkeypatch, caplog):
    """In a multi-process job SIGTERM goes to JAX's preemption notifier: regeneration stops at the part
    boundary the processes agree on, keeping the parts before it, and a re-run finishes from them, redoing a
    part damaged meanwhile."""
    _, ref_ctx, ref_meta, ref_bytes = reference
    cfg = make_config(tiny_dir, tmp_path / "run")
    ctx = RunContext(cfg)
    ctx.target = ref_ctx.target
    checks = []

    def preempt_at_the_third_check() -> bool:
        checks.append(len(checks))
        return len(checks) == 3

    parts_dir = tmp_path / "run" / (regen.RESPONSES_FILE + ".parts")
    with monkeypatch.context() as patch:
        patch.setattr(regen, "reached_preemption", preempt_at_the_third_check)
        with pytest.raises(Preempted, match=rf"preempted while regenerating: .* kept in {parts_dir}"):
            regen.regenerate(cfg, ctx.target, ctx.tokenizer, ctx.eos_ids(), ctx.pad_id(), ctx.model_path)
    assert checks == [0, 1, 2]  # one check before each part
    assert sorted(p.name for p in parts_dir.glob("part-*.jsonl")) == ["part-000000.jsonl", "part-000001.jsonl"]
    damaged = parts_dir / "part-000001.jsonl"  # damaged afterwards (parts are written atomically)
    damaged.write_bytes(damaged.read_bytes()[:len(damaged.read_bytes()) // 2])
    with caplog.at_level("WARNING", logger="flatspec_jax.data.regenerate"):
        meta = regen.regenerate(cfg, ctx.target, ctx.tokenizer, ctx.eos_ids(), ctx.pad_id(), ctx.model_path)
    assert f"redoing 1 damaged part(s) in {parts_dir}, from part-000001.jsonl" in caplog.text
    assert regen.responses_path(cfg.run_dir).read_bytes() == ref_bytes
    assert meta == ref_meta


def test_a_reply_file_that_is_not_jsonl_is_named_with_its_line(tmp_path):
    path = tmp_path / "part-000000.jsonl"
    path.write_text('{"index": 0}\n{"index": 1, "id": "cut\n')
    with pytest.raises(regen.DataFormatError, match=rf"{path}:2: not a JSON record"):
        list(regen._read_jsonl(path))


def test_parts_of_another_flush_every_are_not_resumed(reference, tiny_dir, tmp_path, monkeypatch):
    """flush_every is not in the replies' fingerprint (it only groups batches into parts), so a run
    interrupted at one grouping and resumed at another must discard the parts, not merge batches twice."""
    _, ref_ctx, ref_meta, ref_bytes = reference
    cfg = make_config(tiny_dir, tmp_path / "run")
    original, calls = regen._Regenerator.batch, []

    def failing_batch(self, sources, key):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, sources, key)

    monkeypatch.setattr(regen._Regenerator, "batch", failing_batch)
    with pytest.raises(KeyboardInterrupt):
        regen.regenerate(cfg, ref_ctx.target, ref_ctx.tokenizer, ref_ctx.eos_ids(), ref_ctx.pad_id(),
                         ref_ctx.model_path)
    monkeypatch.setattr(regen._Regenerator, "batch", original)
    regrouped = make_config(tiny_dir, tmp_path / "run", "regenerate.flush_every=2")
    assert regen.regenerate_fingerprint(regrouped, ref_ctx.model_path) == ref_meta["fingerprint"]
    meta = regen.regenerate(regrouped, ref_ctx.target, ref_ctx.tokenizer, ref_ctx.eos_ids(), ref_ctx.pad_id(),
                            ref_ctx.model_path)
    assert regen.responses_path(regrouped.run_dir).read_bytes() == ref_bytes
    assert meta == ref_meta


def test_current_replies_are_reused_and_changed_settings_redo_them(reference, tiny_dir, monkeypatch):
    cfg, ctx, meta, ref_bytes = reference
    calls = []
    monkeypatch.setattr(regen._Regenerator, "batch", lambda self, sources, key: calls.append(1) or [])
    assert regen.regenerate(cfg, ctx.target, ctx.tokenizer, ctx.eos_ids(), ctx.pad_id(), ctx.model_path) == meta
    assert not calls
    regrouped = make_config(tiny_dir, Path(cfg.run_dir), "regenerate.flush_every=5")  # only groups the parts
    assert regen.responses_are_current(regrouped, ctx.model_path)
    respelled = make_config(tiny_dir, Path(cfg.run_dir), f"model.path={tiny_dir}/./")  # the same files
    assert regen.responses_are_current(respelled, ctx.model_path)
    changed = make_config(tiny_dir, Path(cfg.run_dir), "regenerate.max_new_tokens=4")
    assert not regen.responses_are_current(changed, ctx.model_path)
    assert regen.regenerate_fingerprint(changed, ctx.model_path) != meta["fingerprint"]
    greedy = make_config(tiny_dir, Path(cfg.run_dir), "seed=7", "regenerate.top_p=0.5")  # greedy draws nothing
    assert regen.responses_are_current(greedy, ctx.model_path)
    sampled = [regen.regenerate_fingerprint(make_config(tiny_dir, Path(cfg.run_dir), "regenerate.temperature=0.7",
                                                        *extra), ctx.model_path)
               for extra in ([], ["seed=7"], ["regenerate.top_p=0.5"])]
    assert len(set(sampled) | {meta["fingerprint"]}) == 4


def test_replies_replaced_beside_an_old_meta_are_not_current(reference, tmp_path):
    """A run with other settings killed between writing responses.jsonl and its meta leaves the old
    meta beside new replies: they must not pass for the old config's."""
    import shutil

    cfg, ctx, _, ref_bytes = reference
    run_dir = tmp_path / "run"
    shutil.copytree(cfg.run_dir, run_dir)
    copied = dataclasses.replace(cfg, run_dir=str(run_dir))
    assert regen.responses_are_current(copied, ctx.model_path)
    other = ref_bytes.replace(b'"content": "', b'"content": "x', 1)
    regen.responses_path(run_dir).write_bytes(other)
    assert not regen.responses_are_current(copied, ctx.model_path)


def test_samples_are_built_from_the_replies(reference):
    cfg, ctx, _, _ = reference
    records = read_records(Path(cfg.run_dir))
    samples = ctx.samples
    kept = set(samples.ids)
    assert len(samples) > 0 and [r["id"] for r in records if r["id"] in kept] == list(samples.ids)
    assert samples.ids[0] == records[0]["id"]
    first = records[0]["messages"]
    reply_ids = ctx.tokenizer(first[[m["role"] for m in first].index("assistant")]["content"],
                              add_special_tokens=False)["input_ids"]
    tokens, mask = samples[0]
    trained = tokens[mask.astype(bool)]
    assert list(reply_ids[:3]) == list(trained[:3]), "the first sample's trained tokens are not the target's reply"


def test_missing_replies_name_the_file_and_the_command(tiny_dir, tmp_path):
    from flatspec_jax.data.prepare import conversations_source, tokens_fingerprint

    cfg = make_config(tiny_dir, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"responses\.jsonl.*flatspec regenerate"):
        conversations_source(cfg.data, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"responses\.jsonl.*flatspec regenerate"):  # `select` asks this first
        tokens_fingerprint(cfg.data, str(tiny_dir), tmp_path)


def test_regenerate_settings_are_validated():
    with pytest.raises(ConfigError, match="regenerate.turns"):
        load_config(None, ["regenerate.turns=0"])
    with pytest.raises(ConfigError, match="data.responses"):
        load_config(None, ["data.responses=teacher"])


def test_regenerate_verb_needs_target_responses(tmp_path, capsys):
    assert cli.main(["regenerate", "--run-dir", str(tmp_path)]) == 1
    assert "data.responses" in capsys.readouterr().err


def test_part_records_keep_reply_counts_out_of_the_merged_file(reference):
    cfg, _, meta, _ = reference
    records = read_records(Path(cfg.run_dir))
    assert all(set(r) == {"id", "messages"} for r in records)
    assert 0 < meta["reply_tokens"] <= MAX_NEW * 2 * len(records)
    assert np.all([isinstance(v, int) for v in meta["dropped"].values()])


def test_a_source_with_nothing_to_answer_says_why(tiny_dir, tmp_path):
    source = tmp_path / "replies_only.jsonl"
    source.write_text(json.dumps({"id": "r", "messages": [{"role": "user", "content": " "},
                                                          {"role": "assistant", "content": "Hello."}]}) + "\n")
    cfg = make_config(tiny_dir, tmp_path / "run", f"data.source={source}")
    with pytest.raises(ConfigError, match=r"no conversation to answer: 0 first prompts >= data\.max_length=96; "
                                          r"records: 1 records read, 0 conversations kept, 1 skipped "
                                          r"\(1 no_user_text"):
        RunContext(cfg).responses  # noqa: B018 - the property regenerates


def test_a_source_of_prompts_alone_is_answered(tiny_dir, tmp_path):
    """Records without replies (and user turns after a record's last reply) are prompts to answer."""
    source = tmp_path / "prompts.jsonl"
    records = [{"id": "one", "messages": [{"role": "user", "content": "Name a colour."}]},
               {"id": "two", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "human", "value": "And?"}]},
               {"id": "old", "messages": [{"role": "user", "content": "Count to three."},
                                          {"role": "assistant", "content": "One, two, three."},
                                          {"role": "user", "content": "Now to four."}]}]
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = make_config(tiny_dir, tmp_path / "run", f"data.source={source}")
    RunContext(cfg).responses  # noqa: B018 - the property regenerates
    answered = {r["id"]: r["messages"] for r in read_records(Path(cfg.run_dir))}
    assert list(answered) == ["one", "two", "old"]
    assert [m["content"] for m in answered["one"] if m["role"] == "user"] == ["Name a colour."]
    assert [m["content"] for m in answered["old"] if m["role"] == "user"] == ["Count to three.", "Now to four."]
    assert "One, two, three." not in [m["content"] for m in answered["old"]], "the source's reply was kept"
    assert [m["role"] for m in answered["one"]] == ["user", "assistant"]
