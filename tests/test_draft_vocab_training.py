"""``draft.vocab``: a head trained on a reduced vocabulary, through the stages on the tiny target.

One run (the tiny 2-layer target over SmolLM2's 49152-token vocabulary, a few ShareGPT samples)
scores, selects and trains 2 steps with ``draft.vocab=64``. Checked: the checkpoint's metadata
holds the 64 tokens most frequent among the assistant tokens outside the held-out tail (and a resumed
run keeps its checkpoints' own); decoding drafts from exactly those (and a
``decode.draft_vocab`` of another size is an error naming both settings); ``flatspec eval``
records the size; the EAGLE export lists the ids; resuming the run with another ``draft.vocab``
is an error; a head trained on the whole vocabulary still drafts from ``decode.draft_vocab``.
(The loss itself: ``test_head_loss.py``.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from flatspec_jax.checkpoint.manager import CHECKPOINT_DIR, read_meta
from flatspec_jax.config import ConfigError, DecodeConfig, DraftConfig, load_config
from flatspec_jax.stages import eval as eval_stage
from flatspec_jax.stages import export, import_eagle, score, select, train
from flatspec_jax.stages.common import RunContext
from tiny_target import save_tiny_llama, tiny_run_overrides

DRAFT_VOCAB = 64


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def trained_run(tiny_dir: Path, run_dir: Path, *extra: str) -> RunContext:
    cfg = load_config(None, tiny_run_overrides(tiny_dir, run_dir, *extra))
    ctx = RunContext(cfg)
    score.run(cfg, ctx=ctx)
    select.run(cfg)
    summary = train.run(cfg, ctx=ctx)
    assert all(np.isfinite(v) for v in summary.final.values())
    return ctx


@pytest.fixture(scope="module")
def reduced_run(tiny_dir, tmp_path_factory) -> RunContext:
    return trained_run(tiny_dir, tmp_path_factory.mktemp("reduced"), f"draft.vocab={DRAFT_VOCAB}")


def test_checkpoint_holds_the_run_s_most_frequent_tokens(reduced_run):
    _, meta = read_meta(reduced_run.run_dir / CHECKPOINT_DIR)
    expected = reduced_run.draft_ids(DRAFT_VOCAB)
    assert meta["draft_vocab"] == expected.tolist()
    assert len(expected) == DRAFT_VOCAB and set(reduced_run.eos_ids()) <= set(expected.tolist())


def test_the_vocabulary_counts_assistant_tokens_of_training_samples_only(reduced_run):
    """What a draft proposes are assistant tokens; the held-out tail must not shape its vocabulary."""
    samples, heldout = reduced_run.samples, reduced_run.cfg.data.heldout
    counts = np.zeros(reduced_run.target.arch.vocab_size, np.int64)
    for index in range(len(samples) - heldout):
        tokens, loss_mask = samples[index]
        np.add.at(counts, tokens[loss_mask > 0], 1)
    eos = set(reduced_run.eos_ids())
    ranked = [int(t) for t in np.lexsort((np.arange(len(counts)), -counts)) if int(t) not in eos]
    want = sorted(ranked[:DRAFT_VOCAB - len(eos)] + sorted(eos))
    assert reduced_run.draft_ids(DRAFT_VOCAB).tolist() == want
    everything = np.zeros_like(counts)
    np.add.at(everything, samples.tokens, 1)
    top = [set(np.argsort(-c, kind="stable")[:DRAFT_VOCAB].tolist()) for c in (everything, counts)]
    assert top[0] != top[1], "the test data cannot tell counting every token from counting assistant tokens"


def test_resumed_training_keeps_the_vocabulary_its_checkpoints_were_trained_over(reduced_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(reduced_run.run_dir, run_dir)
    cfg = load_config(None, tiny_run_overrides(Path(reduced_run.cfg.model.path), run_dir, f"draft.vocab={DRAFT_VOCAB}",
                                               "train.steps=3"))

    def recounted(*args, **kwargs):
        raise AssertionError("a resumed run counted its draft vocabulary again")

    monkeypatch.setattr(RunContext, "draft_ids", recounted)
    train.run(cfg)
    assert read_meta(run_dir / CHECKPOINT_DIR)[1]["draft_vocab"] == read_meta(
        reduced_run.run_dir / CHECKPOINT_DIR)[1]["draft_vocab"]


def test_decoding_drafts_from_the_trained_tokens(reduced_run):
    expected = reduced_run.draft_ids(DRAFT_VOCAB)
    np.testing.assert_array_equal(reduced_run.decoding_draft_ids(), expected)  # decode.draft_vocab=0
    np.testing.assert_array_equal(reduced_run.decoding_draft_ids(size=DRAFT_VOCAB), expected)
    with pytest.raises(ConfigError, match=rf"decode\.draft_vocab=32: .* its own {DRAFT_VOCAB} tokens \(draft\.vocab\)"):
        reduced_run.decoding_draft_ids(size=32)


def test_a_tree_wider_than_the_heads_own_vocabulary_is_refused_before_decoding(reduced_run, tmp_path):
    cfg = dataclasses.replace(reduced_run.cfg, run_dir=str(tmp_path), draft=DraftConfig(),
                              decode=DecodeConfig(method="tree", top_k=DRAFT_VOCAB + 1, depth=2, total_tokens=8))
    checkpoint = reduced_run.run_dir / CHECKPOINT_DIR
    with pytest.raises(ConfigError, match=rf"decode\.top_k={DRAFT_VOCAB + 1}: .* its own {DRAFT_VOCAB} tokens "
                                          r"\(draft\.vocab\); use decode\.top_k <= 64 or decode\.method=chain"):
        RunContext(cfg).decoding_draft_ids(checkpoint)
    with pytest.raises(ConfigError, match=rf"decode\.top_k={DRAFT_VOCAB + 1}: "):  # eval then decodes a tree
        RunContext(dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, method="ar"))).decoding_draft_ids(
            checkpoint)
    chain = dataclasses.replace(cfg, decode=DecodeConfig(method="chain", top_k=DRAFT_VOCAB + 1, gamma=2))
    assert len(RunContext(chain).decoding_draft_ids(checkpoint)) == DRAFT_VOCAB


def test_eval_records_the_trained_vocabulary_size(reduced_run):
    result = eval_stage.run(reduced_run.cfg, ctx=reduced_run)
    assert result["draft_vocab"] == DRAFT_VOCAB
    assert result["tau"] >= 1.0


def test_export_lists_the_draft_vocabulary(reduced_run, tmp_path):
    out = export.run(reduced_run.cfg, argparse.Namespace(out=str(tmp_path / "eagle")), ctx=reduced_run)
    config = json.loads((out / "config.json").read_text())
    assert config["flatspec"]["draft_vocab"] == reduced_run.draft_ids(DRAFT_VOCAB).tolist()
    imported = tmp_path / "imported"
    import_eagle.run(reduced_run.cfg, argparse.Namespace(input=str(out), out=str(imported)), ctx=reduced_run)
    assert read_meta(imported)[1]["draft_vocab"] == config["flatspec"]["draft_vocab"]
    np.testing.assert_array_equal(reduced_run.decoding_draft_ids(imported), reduced_run.draft_ids(DRAFT_VOCAB))


def test_a_whole_vocabulary_head_drafts_from_decode_draft_vocab(tiny_dir, tmp_path):
    ctx = trained_run(tiny_dir, tmp_path / "whole", "decode.draft_vocab=32")
    _, meta = read_meta(ctx.run_dir / CHECKPOINT_DIR)
    assert meta["draft_vocab"] is None
    np.testing.assert_array_equal(ctx.decoding_draft_ids(), ctx.draft_ids(32))
    assert ctx.decoding_draft_ids(size=0) is None


def test_an_oversized_draft_vocab_is_named(tiny_dir, tmp_path):
    cfg = load_config(None, tiny_run_overrides(tiny_dir, tmp_path, "draft.vocab=49153"))
    with pytest.raises(ValueError, match=r"draft\.vocab=49153 exceeds the target's vocabulary"):
        RunContext(cfg).draft_ids(cfg.draft.vocab, "draft.vocab")


@pytest.mark.parametrize("changes, named", [
    (["draft.vocab=0"], rf"draft\.vocab: {DRAFT_VOCAB} -> 0"),
    (["draft.vocab=32"], rf"draft\.vocab: {DRAFT_VOCAB} -> 32"),
    (["train.learning_rate=0.01", "seed=7"], r"seed: 0 -> 7; train\.learning_rate: 3e-05 -> 0\.01"),
    (["train.loss=tvdpp"], r"train\.loss: 'eagle' -> 'tvdpp'"),
    (["data.selection=run", "select.keep=0.5"], r"the selected samples \(select\.\*"),
    (["data.limit=10"], r"the tokenized samples \(data\.limit: 12 -> 10\)"),
    (["data.heldout=3"], r"data\.heldout: 2 -> 3"),
    (["data.shuffle_seed=1"], r"data\.shuffle_seed: 0 -> 1"),
])
def test_resuming_with_other_inputs_is_an_error_naming_them(reduced_run, tmp_path, changes, named):
    run_dir = tmp_path / "run"
    shutil.copytree(reduced_run.run_dir, run_dir)
    cfg = load_config(None, tiny_run_overrides(Path(reduced_run.cfg.model.path), run_dir, f"draft.vocab={DRAFT_VOCAB}",
                                      "train.steps=4", *changes))
    ctx = RunContext(cfg)
    score.run(cfg, ctx=ctx)
    # select itself refuses a new selection beside checkpoints trained on another (the test below); training
    # must refuse too, as for a manifest written elsewhere.
    (run_dir / CHECKPOINT_DIR).rename(tmp_path / "aside")
    select.run(cfg)
    (tmp_path / "aside").rename(run_dir / CHECKPOINT_DIR)
    with pytest.raises(ConfigError, match=rf"{run_dir / CHECKPOINT_DIR} holds a draft trained with other inputs: "
                                          rf"{named}.*new run_dir"):
        train.run(cfg, ctx=ctx)


def test_select_refuses_a_new_selection_beside_checkpoints_trained_on_all_samples(reduced_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reduced_run.run_dir, run_dir)
    cfg = load_config(None, tiny_run_overrides(Path(reduced_run.cfg.model.path), run_dir, f"draft.vocab={DRAFT_VOCAB}",
                                               "data.selection=run", "select.keep=0.5"))
    score.run(cfg)
    manifest = run_dir / "selection.json"
    before = manifest.read_bytes() if manifest.exists() else None
    with pytest.raises(ConfigError, match=rf"{run_dir / CHECKPOINT_DIR} holds a draft trained on another selection"):
        select.run(cfg)
    assert (manifest.read_bytes() if manifest.exists() else None) == before


def test_offline_features_of_other_inputs_are_refused_naming_what_changed(reduced_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reduced_run.run_dir, run_dir)
    model = Path(reduced_run.cfg.model.path)
    cached = load_config(None, tiny_run_overrides(model, run_dir, f"draft.vocab={DRAFT_VOCAB}",
                                                  "train.features=offline"))
    score.run(cached)  # the scores and the feature cache, in one pass
    cfg = load_config(None, tiny_run_overrides(model, run_dir, f"draft.vocab={DRAFT_VOCAB}", "train.features=offline",
                                               "score.temperature=2.0"))
    with pytest.raises(ConfigError, match=r"the feature cache in .* was made with other inputs "
                                          r"\(score\.temperature: 1\.0 -> 2\.0\); re-run `flatspec cache`"):
        train.run(cfg)


def test_resuming_with_a_longer_run_and_other_bookkeeping_continues(reduced_run, tmp_path, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(reduced_run.run_dir, run_dir)
    cfg = load_config(None, tiny_run_overrides(Path(reduced_run.cfg.model.path), run_dir, f"draft.vocab={DRAFT_VOCAB}",
                                      "train.steps=3", "train.log_every=3", "train.save_every=3",
                                      "train.features=offline"))
    ctx = RunContext(cfg)
    score.run(cfg, ctx=ctx)  # writes the feature cache the offline features need
    with caplog.at_level(logging.INFO, logger="flatspec_jax.train.loop"):
        assert train.run(cfg, ctx=ctx).steps == 3
    assert f"resumed from {run_dir / CHECKPOINT_DIR}/2" in caplog.text  # not a fresh 3-step run
