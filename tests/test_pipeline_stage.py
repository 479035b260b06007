"""``flatspec pipeline`` on the tiny target: every stage in one run directory, the summary, a re-run
that redoes nothing, and the select stage only where training reads its manifest."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from pathlib import Path

import pytest

from flatspec_jax.config import ConfigError, load_config
from flatspec_jax.selection import SELECTION_FILE
from flatspec_jax import scoring
from flatspec_jax.stages import export, import_eagle, pipeline, select, train
from flatspec_jax.stages.common import RunContext
from flatspec_jax.train.metrics import read_metrics
from tiny_target import save_tiny_llama, tiny_run_overrides

OUTPUTS = ("tokens.npz", "scores.parquet", "selection.json", "checkpoints/2/meta/metadata", "eval.json",
           "metrics.jsonl")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def selected_run(tiny_dir, tmp_path_factory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("pipeline")
    cfg = load_config(None, tiny_run_overrides(tiny_dir, run_dir, "data.selection=run", "select.keep=0.5"))
    return run_dir, pipeline.run(cfg)


def test_pipeline_runs_every_stage_and_summarises(selected_run):
    run_dir, text = selected_run
    for name in OUTPUTS:
        assert (run_dir / name).is_file(), name
    assert re.search(r"samples kept +3 of 6 \(sfdd, keep 0\.5; 2 held out\)", text), text
    assert re.search(r"training tokens +256 \(2 steps x 128 tokens, eagle loss, online features\)", text), text
    assert re.search(r"tau \(chain\) +\d\.\d\d tokens per target forward \(\d\.\d\d drafts proposed per round\)",
                     text), text
    assert re.search(r"speedup +\d+\.\d\dx \(.* tokens/s autoregressive, 1 MT-bench turn\)", text), text
    plots = re.search(r"plots +(.+)", text).group(1).split(", ")
    assert plots and all(Path(p).is_file() and p.endswith(".png") for p in plots)


def test_the_summary_of_a_run_without_held_out_samples_says_so_instead_of_nan():
    from flatspec_jax.train.loop import TrainSummary

    cfg = load_config(None, ["data.heldout=0", "eval.limit=1"])
    trained = TrainSummary(steps=2, train_samples=5, train_tokens_per_step=cfg.train.batch_tokens, final={}, heldout={})
    result = {"method": "chain", "tau": 1.5, "drafts_per_round": 2.0, "speedup": 1.1, "tokens_per_s_spec": 11.0,
              "tokens_per_s_ar": 10.0, "turns": 1}
    text = pipeline.summary(cfg, None, trained, result, [])
    assert re.search(r"held-out agreement +none \(data\.heldout=0\)", text), text
    assert "nan" not in text
    trained = dataclasses.replace(trained, left_out=1)
    assert re.search(r"samples kept +all 6 \(data\.selection: null; 0 held out; 1 with nothing to train within "
                     r"train\.row_length left out\)", pipeline.summary(cfg, None, trained, result, []))


def test_metrics_hold_one_record_per_step(selected_run):
    run_dir, _ = selected_run
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    baseline, logged, evaluated = records
    # The untrained head, on the first training batch and on the held-out samples.
    assert {"loss", "loss_feature", "loss_token", "top1", "eval_loss", "eval_top1"} <= set(baseline)
    assert "loss" in logged and "eval_loss" not in logged
    assert "tokens_per_s" not in logged, "step 1 compiled: its time is no throughput"
    assert {"loss", "lr", "tokens_per_s", "eval_loss", "eval_top1"} <= set(evaluated)


def test_rerun_with_the_same_config_redoes_nothing(selected_run, tiny_dir, monkeypatch):
    run_dir, text = selected_run
    before = {name: (run_dir / name).stat().st_mtime_ns for name in OUTPUTS}
    events = sorted((run_dir / "tensorboard").iterdir())

    def no_compiling(*args, **kwargs):
        raise AssertionError("a current run must not compile the scoring step")

    monkeypatch.setattr(scoring, "compile_score_step", no_compiling)
    cfg = load_config(None, tiny_run_overrides(tiny_dir, run_dir, "data.selection=run", "select.keep=0.5"))
    assert pipeline.run(cfg) == text
    assert {name: (run_dir / name).stat().st_mtime_ns for name in OUTPUTS} == before
    assert sorted((run_dir / "tensorboard").iterdir()) == events  # a finished training opens no new event file


def test_without_a_selection_the_pipeline_trains_on_all_samples_and_says_so(tiny_dir, tmp_path):
    cfg = load_config(None, tiny_run_overrides(tiny_dir, tmp_path, "select.keep=0.5"))
    assert cfg.data.selection is None
    text = pipeline.run(cfg)
    assert re.search(r"samples kept +all 6 \(data\.selection: null; 2 held out\)", text), text
    assert not (tmp_path / SELECTION_FILE).exists()


def test_select_refuses_scores_made_with_other_settings(selected_run, tiny_dir):
    run_dir, _ = selected_run
    cfg = load_config(None, tiny_run_overrides(tiny_dir, run_dir, "data.selection=run", "score.temperature=2.0"))
    with pytest.raises(ConfigError, match=r"scores\.parquet was scored with other inputs than this config's "
                                          r"\(score\.temperature: 1\.0 -> 2\.0\): run `flatspec score`"):
        select.run(cfg)


def test_train_refuses_a_selection_made_with_other_settings(selected_run, tiny_dir, tmp_path):
    """`flatspec train` alone, after select.* changed without `flatspec select`, must not train on the old
    selection under the new settings' name; another run's manifest must hold out as many samples."""
    run_dir, _ = selected_run
    stale = load_config(None, tiny_run_overrides(tiny_dir, run_dir, "data.selection=run", "select.keep=0.25"))
    with pytest.raises(ConfigError, match=r"data\.selection=run: .*selection\.json was made with other settings "
                                          r"\(select\.keep: 0\.5 -> 0\.25\); run `flatspec select`"):
        train.run(stale)
    elsewhere = load_config(None, tiny_run_overrides(tiny_dir, tmp_path / "other", "data.heldout=3",
                                                     f"data.selection={run_dir / 'selection.json'}"))
    with pytest.raises(ConfigError, match=r"holds out 2 samples but data\.heldout=3"):
        train.run(elsewhere)


@pytest.mark.parametrize("setting, message", [
    ("data.heldout=100", r"flatspec train: ConfigError: data\.heldout=100 leaves no training sample out of 8"),
    ("train.batch_tokens=8192", r"flatspec train: ConfigError: only \d+ packed rows of training data"),
    ("draft.vocab=100000", r"flatspec train: ConfigError: draft\.vocab=100000 exceeds the target's vocabulary"),
])
def test_input_errors_are_one_line_naming_the_setting(tiny_dir, tmp_path, capsys, setting, message):
    from flatspec_jax import cli

    overrides = [x for o in tiny_run_overrides(tiny_dir, tmp_path, setting) for x in ("--set", o)]
    assert cli.main(["train", *overrides]) == 1
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_eval_fingerprint_follows_the_held_out_count_only_when_it_makes_the_draft_vocabulary(tiny_dir, tmp_path):
    """decode.draft_vocab counts tokens before the held-out tail: data.heldout changes the ids decoded with."""
    from flatspec_jax.stages.eval import _fingerprint

    def fingerprint(*overrides):
        cfg = load_config(None, tiny_run_overrides(tiny_dir, tmp_path, *overrides))
        return _fingerprint(cfg, tmp_path / "checkpoints", 2, {"trained": "head"})

    assert fingerprint("decode.draft_vocab=40", "data.heldout=2") != fingerprint("decode.draft_vocab=40",
                                                                                 "data.heldout=3")
    assert fingerprint("data.heldout=2") == fingerprint("data.heldout=3")


def test_eval_stays_current_in_a_moved_run_and_not_for_edited_prompts(selected_run, tiny_dir, tmp_path):
    import shutil

    from flatspec_jax.stages.eval import eval_is_current

    run_dir, _ = selected_run
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    cfg = load_config(None, tiny_run_overrides(tiny_dir, moved, "data.selection=run", "select.keep=0.5"))
    assert eval_is_current(cfg, moved / "checkpoints")
    model_copy = tmp_path / "model_copy"
    shutil.copytree(tiny_dir, model_copy)
    elsewhere = load_config(None, tiny_run_overrides(model_copy, moved, "data.selection=run", "select.keep=0.5",
                                                      "data.num_workers=3"))
    assert eval_is_current(elsewhere, moved / "checkpoints")  # the same model files, a setting eval never reads
    longer = load_config(None, tiny_run_overrides(tiny_dir, moved, "data.selection=run", "select.keep=0.5",
                                                  "decode.max_new_tokens=7"))
    assert not eval_is_current(longer, moved / "checkpoints")

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say hello."}\n')
    on_file = load_config(None, tiny_run_overrides(tiny_dir, moved, "data.selection=run", "select.keep=0.5",
                                                    f"eval.prompts={prompts}"))
    assert not eval_is_current(on_file, moved / "checkpoints")  # other prompts than eval.json's
    from flatspec_jax.stages import eval as eval_stage

    eval_stage.run(on_file)
    assert eval_is_current(on_file, moved / "checkpoints")
    prompts.write_text('{"prompt": "Say goodbye."}\n')
    assert not eval_is_current(on_file, moved / "checkpoints")


def test_eval_decodes_prompts_in_batches(selected_run, tiny_dir, tmp_path):
    """eval.batch_size=2 over 3 questions: two calls, the second filled up with a copy that is dropped."""
    import shutil

    from flatspec_jax.stages import eval as eval_stage

    run_dir, _ = selected_run
    copy = tmp_path / "batched"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "plots")
    batched = load_config(None, tiny_run_overrides(tiny_dir, copy, "data.selection=run", "select.keep=0.5",
                                                   "eval.limit=3", "eval.batch_size=2"))
    result = eval_stage.run(batched)
    assert (copy / "plots" / "depth_acceptance.png").is_file()  # eval draws its own plot
    assert result["warmup"] == 0
    assert sum(result["per_depth_proposed"][:1]) == sum(q["rounds"] for q in result["questions"])  # depth 1: all
    for question in result["questions"]:
        assert len(question["per_depth_acceptance"]) == len(result["per_depth_acceptance"])
        assert question["tokens_per_s_spec"] / question["tokens_per_s_ar"] == pytest.approx(question["speedup"])
    assert result["batch_size"] == 2 and result["turns"] == 3
    assert [q["batch"] for q in result["questions"]] == [0, 0, 1]
    assert len({q["prompt_id"] for q in result["questions"]}) == 3
    first, second, third = result["questions"]
    assert first["ar_seconds"] == second["ar_seconds"] != third["ar_seconds"]
    assert result["tokens_ar"] == sum(q["ar_tokens"] for q in result["questions"])
    assert result["same_output_fraction"] == 1.0  # greedy rows of a batch equal their autoregressive decoding


def test_a_mesh_that_leaves_a_process_out_is_refused_before_anything_is_placed_on_it(tmp_path, monkeypatch):
    """Every verb takes its mesh from RunContext.mesh: a process holding none of its devices would fail
    placing the target with a raw JAX error (or hang the others), so the mesh is checked there."""
    import jax

    ctx = RunContext(load_config(None, [f"run_dir={tmp_path}", "mesh.data=1"]))
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # the 8 test devices are all process 0's
    with pytest.raises(ConfigError, match=r"mesh \{'data': 1, 'fsdp': 1, 'tensor': 1\} holds devices of "
                                          r"process\(es\) \[0\] only, but all 2 processes"):
        ctx.mesh


def test_a_second_command_on_a_busy_run_dir_is_refused(tiny_dir, tmp_path, capsys):
    """Two commands writing one run directory at once would interleave their outputs."""
    from flatspec_jax import cli, runtime

    overrides = [x for o in tiny_run_overrides(tiny_dir, tmp_path) for x in ("--set", o)]
    with runtime.run_dir_lock(tmp_path):
        assert cli.main(["select", *overrides]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"flatspec select: run directory {tmp_path} is in use by another flatspec process "
                     rf"\(pid {os.getpid()}\)", err), err


def test_a_run_dir_that_is_a_file_is_one_line_naming_it(tiny_dir, tmp_path, capsys):
    from flatspec_jax import cli

    run_dir = tmp_path / "afile"
    run_dir.write_text("")
    overrides = [x for o in tiny_run_overrides(tiny_dir, run_dir) for x in ("--set", o)]
    assert cli.main(["select", *overrides]) == 1
    err = capsys.readouterr().err
    assert err == f"flatspec select: NotADirectoryError: run directory {run_dir} is a file, not a directory\n", err


def test_taking_the_lock_removes_temporaries_a_killed_run_left(tmp_path):
    from flatspec_jax import runtime

    leftovers = [tmp_path / ".scores.parquet.k2j3.tmp", tmp_path / "features" / ".shard-000002.npy.67_k9.tmp",
                 tmp_path / "plots" / ".position_flatness.png.x1.tmp"]
    kept = [tmp_path / "scores.parquet", tmp_path / "features" / "shard-000002.npy"]
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    with runtime.run_dir_lock(tmp_path):
        pass
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in kept)


def test_select_names_a_cut_scores_file_as_unreadable(selected_run, tiny_dir, tmp_path):
    import shutil

    run_dir, _ = selected_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    scores = copy / "scores.parquet"
    scores.write_bytes(scores.read_bytes()[:100])
    cfg = load_config(None, tiny_run_overrides(tiny_dir, copy, "data.selection=run", "select.keep=0.5"))
    with pytest.raises(ConfigError, match=r"scores\.parquet is unreadable .*run `flatspec score`"):
        select.run(cfg)


@pytest.mark.parametrize("change, reason", [
    ("model.dtype=bfloat16", r"model\.dtype: 'float32' -> 'bfloat16'"),
    ("select.keep=0.9", r"the selected samples \(select\.\*"),  # the selection, recomputed in memory, differs
    ("score.temperature=2.0", r"the scores, which would be recomputed"),
    ("data.limit=10", r"the tokenized samples \(data\.limit: 12 -> 10\)"),
    ("data.selection=null", r"the selected samples"),
])
def test_pipeline_refuses_unresumable_settings_before_rewriting_anything(selected_run, tiny_dir, change, reason):
    """Settings training would refuse after the stages before it had rewritten the replies, scores or selection
    it was trained on are refused before the first stage."""
    run_dir, _ = selected_run
    before = {name: (run_dir / name).stat().st_mtime_ns for name in OUTPUTS}
    cfg = load_config(None, tiny_run_overrides(tiny_dir, run_dir, "data.selection=run", "select.keep=0.5", change))
    with pytest.raises(ConfigError, match=r"holds a draft trained with other inputs: " + reason):
        pipeline.run(cfg)
    assert {name: (run_dir / name).stat().st_mtime_ns for name in OUTPUTS} == before


def test_pipeline_refuses_a_bad_prompts_file_before_the_first_stage(tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n{"prompt": \n')
    run_dir = tmp_path / "run"
    cfg = load_config(None, tiny_run_overrides(tiny_dir, run_dir, f"eval.prompts={prompts}", "eval.limit=2"))
    with pytest.raises(ValueError, match=rf"{prompts}:2: not valid JSON"):
        pipeline.run(cfg)
    assert not (run_dir / "tokens.npz").exists()
    prompts.write_text('{"prompt": "Hi"}\n{"id": "long", "prompt": "' + "word " * 600 + '"}\n')
    with pytest.raises(ValueError, match=rf"{prompts}: prompt 'long' is \d+ tokens in the chat template, leaving no "
                                         r"room for a new token in decode\.max_cache_length=512"):
        pipeline.run(cfg)
    assert not (run_dir / "tokens.npz").exists()


def test_select_refuses_to_rewrite_the_selection_the_checkpoints_were_trained_on(selected_run, tiny_dir):
    """Training would then refuse to resume; the manifest is left as it is."""
    run_dir, _ = selected_run
    before = (run_dir / "selection.json").read_bytes()
    cfg = load_config(None, tiny_run_overrides(tiny_dir, run_dir, "data.selection=run", "select.keep=0.9"))
    with pytest.raises(ConfigError, match=r"checkpoints holds a draft trained on another selection"):
        select.run(cfg)
    assert (run_dir / "selection.json").read_bytes() == before


def test_pipeline_lets_a_select_change_that_keeps_the_selection_resume(selected_run, tiny_dir):
    """A changed selection setting whose selection, recomputed, holds the same ids is not refused;
    one whose ids change is."""
    run_dir, _ = selected_run
    cfg = load_config(None, tiny_run_overrides(tiny_dir, run_dir, "data.selection=run", "select.keep=0.5",
                                               "select.keep=0.45"))
    pipeline.check_training_resumes(cfg, RunContext(cfg))
    other = load_config(None, tiny_run_overrides(tiny_dir, run_dir, "data.selection=run", "select.keep=0.9"))
    with pytest.raises(ConfigError, match=r"holds a draft trained with other inputs: the selected samples"):
        pipeline.check_training_resumes(other, RunContext(other))


def test_training_refuses_a_run_dir_holding_an_imported_head(selected_run, tiny_dir, tmp_path):
    """`flatspec import` writes a params-only step 0; training there would start a fresh head beside it and
    rotate it out of the checkpoints."""
    run_dir, _ = selected_run
    cfg = load_config(None, tiny_run_overrides(tiny_dir, run_dir, "data.selection=run", "select.keep=0.5"))
    exported = export.run(cfg, argparse.Namespace(format="eagle", checkpoint=None, step=None,
                                                  out=str(tmp_path / "eagle"), dtype="float32"))
    imported_run = tmp_path / "imported_run"
    imported_cfg = load_config(None, tiny_run_overrides(tiny_dir, imported_run, "data.selection=null"))
    import_eagle.run(imported_cfg, argparse.Namespace(format="eagle", input=str(exported), out=None))
    with pytest.raises(ConfigError, match=r"holds an imported draft head \(step 0, parameters only\)"):
        train.run(imported_cfg)
    with pytest.raises(ConfigError, match=r"holds an imported draft head \(step 0, parameters only\)"):
        pipeline.run(imported_cfg)  # before scoring, not after it
    assert not (imported_run / "scores.parquet").exists()
    assert sorted(p.name for p in (imported_run / "checkpoints").iterdir() if p.name.isdigit()) == ["0"]


def test_a_lowered_train_steps_reports_the_checkpoint_it_keeps(selected_run, tiny_dir, caplog):
    run_dir, _ = selected_run
    cfg = load_config(None, tiny_run_overrides(tiny_dir, run_dir, "data.selection=run", "select.keep=0.5",
                                               "train.steps=1"))
    with caplog.at_level("WARNING", logger="flatspec_jax.train.loop"):
        summary = train.run(cfg)
    assert summary.steps == 2
    assert "holds step 2 (train.steps=1): nothing to train; the head of step 2 is the run's" in caplog.text


def test_training_warns_about_samples_cut_at_the_row_length(tiny_dir, tmp_path, caplog):
    """Samples are scored and selected whole; a train.row_length below data.max_length trains on their heads only,
    and leaves out a sample whose head holds no assistant token to train on (the first training sample's first
    assistant token is its 64th)."""
    cfg = load_config(None, tiny_run_overrides(tiny_dir, tmp_path / "run", "train.row_length=48",
                                               "train.batch_tokens=96", "train.steps=1"))
    with caplog.at_level("INFO", logger="flatspec_jax.train.loop"):
        train.run(cfg)
    assert re.search(r"6 of 6 training samples are longer than train\.row_length=48: 96 of their 384 tokens are cut "
                     r"\(data\.max_length=64\); 1 keep no assistant token to train on and are left out",
                     caplog.text), caplog.text
    assert "training on 5 samples" in caplog.text, caplog.text
    short = load_config(None, tiny_run_overrides(tiny_dir, tmp_path / "run", "train.row_length=32",
                                                 "train.batch_tokens=64", "train.steps=1"))
    with pytest.raises(ConfigError, match=r"train\.row_length=32 leaves no assistant token to train on in any of "
                                          r"the 6 training samples"):
        train.run(short)


def test_generate_prints_only_the_reply_and_a_draft_leaves_it_unchanged(selected_run, tiny_dir, capsys, caplog):
    """`flatspec generate`, greedy: autoregressive, speculative with the run's draft (decode.method=chain),
    and with decode.method=ar, which decodes without loading the draft; all print the same reply."""
    import logging

    from flatspec_jax import cli

    run_dir, _ = selected_run
    overrides = [x for o in tiny_run_overrides(tiny_dir, run_dir, "data.selection=run", "select.keep=0.5",
                                               "decode.max_new_tokens=12") for x in ("--set", o)]
    replies, draft = {}, ["--draft", str(run_dir / "checkpoints")]
    with caplog.at_level(logging.INFO, logger="flatspec_jax"):
        for name, extra in [("ar", []), ("chain", draft), ("ar with a draft", [*draft, "--set", "decode.method=ar"])]:
            caplog.clear()
            assert cli.main(["generate", "--prompt", "Say hello.", *overrides, *extra]) == 0
            replies[name] = capsys.readouterr().out
            method = "chain" if name == "chain" else "ar"
            assert any(f"{method} decoding: " in r.getMessage() for r in caplog.records), name
            assert ("loaded draft head" in caplog.text) == (name == "chain"), name
            assert ("is not used: decode.method=ar" in caplog.text) == (name == "ar with a draft"), name
    assert replies["chain"] == replies["ar"] == replies["ar with a draft"]
    assert replies["ar"] == replies["ar"].rstrip("\n") + "\n"  # the reply alone on stdout (logs go to stderr)
    assert cli.main(["generate", "--prompt", "  ", *overrides]) == 1
    assert "--prompt is empty" in capsys.readouterr().err
    assert cli.main(["generate", "--prompt", "caf\udce9", *overrides]) == 1  # Latin-1 bytes under a UTF-8 locale
    assert "--prompt is not UTF-8 text" in capsys.readouterr().err


def test_generate_counts_a_draft_vocabulary_from_the_samples_built_and_never_writes_them(selected_run, tiny_dir,
                                                                                          tmp_path, capsys):
    """decode.draft_vocab needs the run's samples: generate, which takes no lock on the run directory,
    reads those an earlier verb built and refuses to build them itself."""
    from flatspec_jax import cli

    run_dir, _ = selected_run
    draft = ["--draft", str(run_dir / "checkpoints"), "--set", "decode.draft_vocab=10"]
    overrides = [x for o in tiny_run_overrides(tiny_dir, run_dir, "data.selection=run", "select.keep=0.5",
                                               "decode.max_new_tokens=4") for x in ("--set", o)]
    assert cli.main(["generate", "--prompt", "Say hello.", *overrides, *draft]) == 0
    assert capsys.readouterr().out.strip()
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert cli.main(["generate", "--prompt", "Say hello.", *overrides, "--run-dir", str(empty), *draft]) == 1
    assert re.search(r"decode\.draft_vocab counts the run's samples, but .*tokens\.npz is missing",
                     capsys.readouterr().err)
    assert not any(empty.iterdir())
