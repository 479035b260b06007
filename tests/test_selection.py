"""Tests for flatspec_jax.selection and the ``flatspec select`` stage on hand-built score tables."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flatspec_jax.config import Config, ConfigError, DataConfig, RegenerateConfig, ScoreConfig, SelectConfig
from flatspec_jax.data.prepare import tokens_fingerprint
from flatspec_jax.data.regenerate import META_FILE as REPLIES_META_FILE
from flatspec_jax.data.regenerate import RESPONSES_FILE, regenerate_fingerprint
from flatspec_jax.fingerprint import file_sha256
from flatspec_jax.scoring import FINGERPRINT_KEY
from flatspec_jax.selection import (
    SCORES_FILE,
    ManifestError,
    ScoresError,
    keep_count,
    manifest_is_current,
    read_manifest,
    round_half_up,
    select_samples,
    write_manifest,
)
from flatspec_jax.stages import select as select_stage
from flatspec_jax.stages import train as train_stage
from flatspec_jax.stages.common import RunContext
from flatspec_jax.stages.score import score_fingerprint

NAN = math.nan


def scores_table(flatness, entropy=None, nll=None, n_trained=None, ids=None) -> pa.Table:
    """A scores.parquet-like table; a NaN flatness means no trained token unless n_trained says otherwise."""
    n = len(flatness)
    flatness = np.asarray(flatness, np.float64)
    entropy = np.asarray(entropy if entropy is not None else np.arange(n, dtype=float), np.float64)
    nll = np.asarray(nll if nll is not None else np.arange(n, 0, -1, dtype=float), np.float64)
    if n_trained is None:
        n_trained = np.where(np.isnan(flatness), 0, 10 + np.arange(n))
    missing = np.asarray(n_trained) == 0
    entropy, nll = np.where(missing, np.nan, entropy), np.where(missing, np.nan, nll)
    return pa.table({
        "id": ids or [f"s{i}" for i in range(n)],
        "n_tokens": np.full(n, 40, np.int64) + np.arange(n),
        "n_trained_tokens": np.asarray(n_trained, np.int64),
        "flatness": flatness, "flatness_all": flatness, "entropy": entropy,
        "top1_prob": np.full(n, 0.5), "nll": nll, "config_hash": ["abc"] * n,
    })


#            s0   s1   s2   s3   s4   s5   s6   s7   s8 (held out with heldout=2: s7, s8)
FLATNESS = [0.30, NAN, 0.10, 0.30, 0.50, 0.20, 0.40, 0.90, 0.05]
ENTROPY = [1.0, 0.0, 3.0, 2.0, 0.5, 3.0, 1.5, 9.0, 9.0]
NLL = [2.0, 0.0, 1.0, 4.0, 0.5, 4.0, 3.0, 9.0, 9.0]


@pytest.fixture
def table() -> pa.Table:
    return scores_table(FLATNESS, ENTROPY, NLL)


@pytest.mark.parametrize("rule, keep, expected, cut", [
    # 7 candidates, 6 eligible (s1 has no trained token); keep 0.5 -> round_half_up(3) = 3.
    ("sfdd", 0.5, ("s0", "s4", "s6"), 0.30),          # 0.5, 0.4, then the 0.30 tie: s0 before s3
    ("flatness_low", 0.5, ("s0", "s2", "s5"), 0.30),  # 0.1, 0.2, then the 0.30 tie: s0 first
    ("entropy", 0.5, ("s2", "s3", "s5"), 2.0),        # 3.0 tie (s2 before s5), then 2.0
    ("nll", 0.5, ("s3", "s5", "s6"), 3.0),            # 4.0 tie (s3 before s5), then 3.0
    ("sfdd", 0.25, ("s4", "s6"), 0.40),               # 1.5 -> 2
    ("sfdd", 0.01, ("s4",), 0.50),                    # 0.06 -> at least 1
    ("sfdd", 1.0, ("s0", "s2", "s3", "s4", "s5", "s6"), 0.10),  # every eligible; never the NaN one
])
def test_score_rules(table, rule, keep, expected, cut):
    selection = select_samples(table, rule, keep, seed=0, heldout=2)
    assert selection.ids == expected
    assert selection.indices == tuple(int(s[1:]) for s in expected)
    assert selection.cut == pytest.approx(cut)
    assert (selection.candidates, selection.eligible, selection.total) == (7, 6, 9)
    assert selection.heldout_ids == ("s7", "s8")
    assert selection.seed is None


def test_all_keeps_every_candidate_whatever_keep(table):
    selection = select_samples(table, "all", 0.1, seed=3, heldout=2)
    assert selection.ids == tuple(f"s{i}" for i in range(7))  # the NaN sample s1 included
    assert selection.keep == 1.0 and selection.cut is None and selection.seed is None


def test_random_rule_is_seeded_and_skips_nan(table):
    big = scores_table(np.r_[np.linspace(0.1, 0.9, 60), [NAN] * 20])
    first = select_samples(big, "random", 0.5, seed=7, heldout=5)
    assert first == select_samples(big, "random", 0.5, seed=7, heldout=5)
    assert first.ids != select_samples(big, "random", 0.5, seed=8, heldout=5).ids
    assert first.count == 30 and first.eligible == 60 and first.candidates == 75
    assert all(i < 60 for i in first.indices)  # no NaN (untrained) sample, none of the held-out tail
    assert list(first.indices) == sorted(first.indices) and first.seed == 7 and first.cut is None
    small = select_samples(table, "random", 1.0, seed=0, heldout=2)
    assert small.ids == ("s0", "s2", "s3", "s4", "s5", "s6")


def test_heldout_tail_is_never_selected(table):
    # s7 has the highest flatness and s8 the lowest, but both are held out.
    assert "s7" not in select_samples(table, "sfdd", 1.0, 0, heldout=2).ids
    assert "s8" not in select_samples(table, "flatness_low", 1.0, 0, heldout=2).ids
    assert select_samples(table, "sfdd", 0.01, 0, heldout=0).ids == ("s7",)
    with pytest.raises(ValueError, match="heldout=9 leaves no candidate"):
        select_samples(table, "sfdd", 0.5, 0, heldout=9)


def test_score_rules_skip_samples_without_a_trained_token_whatever_their_score():
    table = scores_table([0.9, 0.1, 0.2], n_trained=[0, 5, 5])  # s0: the flattest, but nothing to train
    selection = select_samples(table, "sfdd", 1.0, 0, heldout=0)
    assert selection.ids == ("s1", "s2") and selection.eligible == 2


def test_output_is_in_file_order_not_score_order():
    table = scores_table([0.1, 0.9, 0.5, 0.7, 0.3])
    selection = select_samples(table, "sfdd", 0.6, 0, heldout=0)
    assert selection.ids == ("s1", "s2", "s3") and selection.cut == 0.5


@pytest.mark.parametrize("keep, n, count", [
    (0.5, 7, 4), (0.5, 6, 3), (0.25, 10, 3), (0.35, 10, 4), (0.1, 3, 1), (0.01, 1, 1), (1.0, 10, 10),
    (0.3, 10, 3), (0.15, 10, 2), (0.2, 7, 1), (0.999, 3, 3),
])
def test_keep_count_rounds_half_up(keep, n, count):
    assert keep_count(keep, n) == count


def test_round_half_up():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 2.4999, 3.0)] == [1, 2, 3, 2, 3]


def test_errors_name_the_problem(table):
    with pytest.raises(ValueError, match="unknown selection rule 'best'"):
        select_samples(table, "best", 0.5, 0, 0)
    with pytest.raises(ValueError, match="keep must be in"):
        select_samples(table, "sfdd", 0.0, 0, 0)
    with pytest.raises(ValueError, match="lacks column 'nll'"):
        select_samples(table.drop(["nll"]), "sfdd", 0.5, 0, 0)
    with pytest.raises(ValueError, match="'s0' more than once"):
        select_samples(scores_table([0.1, 0.2], ids=["s0", "s0"]), "sfdd", 0.5, 0, 0)
    with pytest.raises(ValueError, match="nothing to select"):
        select_samples(scores_table([NAN, NAN, 0.3]), "sfdd", 0.5, 0, heldout=1)


def test_summary(table):
    summary = select_samples(table, "sfdd", 0.5, 0, heldout=2).summary
    assert summary["kept"]["samples"] == 3 and summary["candidates"]["samples"] == 7
    assert summary["kept"]["flatness"] == {"mean": pytest.approx(0.4), "median": 0.4, "min": 0.3, "max": 0.5}
    # The NaN sample counts as a candidate but not in the score statistics.
    assert summary["candidates"]["flatness"]["min"] == 0.1
    trained = 10 + np.arange(9)
    assert summary["kept"]["trained_tokens"] == trained[[0, 4, 6]].sum()
    assert summary["candidates"]["trained_tokens"] == trained[[0, 2, 3, 4, 5, 6]].sum()
    assert summary["trained_tokens_kept_fraction"] == pytest.approx(40 / 80)


@pytest.fixture
def run_files(tmp_path, table):
    scores = tmp_path / "scores.parquet"
    pq.write_table(table, scores)
    return tmp_path, scores


def test_manifest_is_byte_reproducible_and_relative(run_files, table):
    directory, scores = run_files
    selection = select_samples(table, "sfdd", 0.5, 0, heldout=2)
    first = write_manifest(directory / "selection.json", selection, scores).read_bytes()
    second = write_manifest(directory / "selection.json", select_samples(table, "sfdd", 0.5, 0, 2), scores)
    assert second.read_bytes() == first and first.endswith(b"}\n")
    manifest = read_manifest(second)
    assert manifest["scores_path"] == "scores.parquet"
    assert manifest["ids"] == ["s0", "s4", "s6"] and manifest["count"] == 3 and manifest["cut"] == 0.3
    assert manifest["heldout_ids"] == ["s7", "s8"] and "evaluation set" in manifest["heldout_note"]
    assert str(directory) not in first.decode()
    assert manifest_is_current(second, scores, "sfdd", 0.5, 0, 2)
    # The seed does not matter to a deterministic rule; every other setting does.
    assert manifest_is_current(second, scores, "sfdd", 0.5, 123, 2)
    assert not manifest_is_current(second, scores, "sfdd", 0.4, 0, 2)
    assert not manifest_is_current(second, scores, "nll", 0.5, 0, 2)
    assert not manifest_is_current(second, scores, "sfdd", 0.5, 0, 3)
    assert not manifest_is_current(directory / "missing.json", scores, "sfdd", 0.5, 0, 2)


def test_hash_mismatch_makes_manifest_stale(run_files, table):
    directory, scores = run_files
    path = write_manifest(directory / "selection.json", select_samples(table, "sfdd", 0.5, 0, 2), scores)
    assert manifest_is_current(path, scores, "sfdd", 0.5, 0, 2)
    pq.write_table(table.slice(0, 8), scores)
    assert not manifest_is_current(path, scores, "sfdd", 0.5, 0, 2)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("ids"), "missing key 'ids'"),
    (lambda m: m.pop("scores_sha256"), "missing key 'scores_sha256'"),
    (lambda m: m.update(rule="best"), "key 'rule' must be one of"),
    (lambda m: m.update(keep=1.5), "key 'keep' must be a number in"),
    (lambda m: m.update(scores_sha256="xyz"), "key 'scores_sha256' must be 64"),
    (lambda m: m.update(ids=["s0", 4, "s6"]), "key 'ids' must be a list of strings"),
    (lambda m: m.update(count=2), "key 'ids' has 3 entries but 'count' says 2"),
    (lambda m: m.update(ids=["s0", "s4", "s7"]), "key 'ids' selects a held-out sample"),
])
def test_bad_manifest_names_the_file_and_key(run_files, table, edit, message):
    directory, scores = run_files
    path = write_manifest(directory / "selection.json", select_samples(table, "sfdd", 0.5, 0, 2), scores)
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=message) as err:
        read_manifest(path)
    assert str(path) in str(err.value)
    assert not manifest_is_current(path, scores, "sfdd", 0.5, 0, 2)


def test_unreadable_manifest(tmp_path):
    path = tmp_path / "selection.json"
    path.write_text('{"rule": "sfdd",')
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(path)
    with pytest.raises(ManifestError, match="cannot read"):
        read_manifest(tmp_path / "nope.json")
    path.write_bytes(b"PAR1\xba\xff\x00")
    with pytest.raises(ManifestError, match=rf"{path}: not a UTF-8 text file"):
        read_manifest(path)


def write_scores_of(cfg: Config, table: pa.Table) -> None:
    """The scores file `flatspec score` would write for ``cfg`` (the stage checks its fingerprint)."""
    run_dir = Path(cfg.run_dir)
    fingerprint = score_fingerprint(cfg, tokens_fingerprint(cfg.data, RunContext(cfg).model_path, run_dir))
    pq.write_table(table.replace_schema_metadata({FINGERPRINT_KEY: fingerprint.encode()}), run_dir / SCORES_FILE)


def test_stage_writes_then_skips(run_files, table, caplog):
    directory, _ = run_files
    cfg = Config(run_dir=str(directory), select=SelectConfig(rule="sfdd", keep=0.5), data=DataConfig(heldout=2))
    write_scores_of(cfg, table)
    with caplog.at_level(logging.INFO):
        manifest = select_stage.run(cfg)
    assert manifest["ids"] == ["s0", "s4", "s6"]
    assert "kept 3 of 7 candidate samples (6 eligible, 2 held out)" in caplog.text and "cut flatness 0.3" in caplog.text
    mtime = (directory / "selection.json").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert select_stage.run(cfg) == manifest
    assert "is current" in caplog.text and (directory / "selection.json").stat().st_mtime_ns == mtime
    other = Config(run_dir=str(directory), select=SelectConfig(rule="nll", keep=0.5), data=DataConfig(heldout=2))
    assert select_stage.run(other)["rule"] == "nll"


def test_stage_refuses_scores_of_other_settings(run_files, table):
    directory, _ = run_files
    write_scores_of(Config(run_dir=str(directory), score=ScoreConfig(temperature=2.0)), table)
    # A scores file that does not record its inputs (written by an older version, as here): a generic reason.
    with pytest.raises(ConfigError, match=r"scores\.parquet was scored with other inputs than this config's "
                                          r"\(other data, model or score\.\* settings\)"):
        select_stage.run(Config(run_dir=str(directory)))


def test_train_refuses_a_current_selection_of_stale_scores(run_files, table):
    """`flatspec train` alone after score.* changed: the manifest still matches the scores file, but the
    scores are not this config's, so neither is the selection."""
    directory, _ = run_files
    cfg = Config(run_dir=str(directory), select=SelectConfig(rule="sfdd", keep=0.5),
                 data=DataConfig(heldout=2, selection="run"))
    write_scores_of(cfg, table)
    select_stage.run(cfg)
    assert train_stage.selected_ids(cfg, RunContext(cfg).model_path) == ["s0", "s4", "s6"]
    hotter = dataclasses.replace(cfg, score=ScoreConfig(temperature=2.0))
    with pytest.raises(ConfigError, match=r"scores\.parquet was scored with other inputs than this config's "
                                          r"\(other data, model or score\.\* settings\): run `flatspec score`"):
        train_stage.selected_ids(hotter, RunContext(hotter).model_path)


def test_select_and_train_refuse_scores_of_replies_that_would_be_regenerated(run_files, table):
    """With data.responses=target the scores are of the run's replies: after regenerate.* changed they
    are not this config's, whatever the tokenized samples' fingerprint on disk says."""
    directory, _ = run_files
    data = DataConfig(heldout=2, selection="run", responses="target")
    cfg = Config(run_dir=str(directory), select=SelectConfig(rule="sfdd", keep=0.5), data=data)
    replies = directory / RESPONSES_FILE
    replies.write_text('{"id": "s0", "messages": [{"role": "user", "content": "hi"}, '
                       '{"role": "assistant", "content": "yo"}]}\n')
    (directory / REPLIES_META_FILE).write_text(json.dumps({
        "fingerprint": regenerate_fingerprint(cfg, RunContext(cfg).model_path),
        "responses_sha256": file_sha256(replies)}))
    write_scores_of(cfg, table)
    assert select_stage.run(cfg)["ids"] == ["s0", "s4", "s6"]
    sampled = dataclasses.replace(cfg, regenerate=RegenerateConfig(temperature=1.0))
    message = r"scores the target's replies in .*: run `flatspec regenerate` and `flatspec score`"
    with pytest.raises(ConfigError, match=message):
        select_stage.run(sampled)
    with pytest.raises(ConfigError, match=message):
        train_stage.selected_ids(sampled, RunContext(sampled).model_path)


def test_stage_names_a_scores_file_nothing_can_be_selected_from(run_files):
    directory, _ = run_files
    cfg = Config(run_dir=str(directory), select=SelectConfig(rule="sfdd", keep=0.5), data=DataConfig(heldout=2))
    write_scores_of(cfg, scores_table([NAN] * 5))
    with pytest.raises(ScoresError, match=rf"^{directory / SCORES_FILE}: none of the 3 candidate samples"):
        select_stage.run(cfg)
    write_scores_of(cfg, scores_table([0.5] * 5).drop(["flatness"]))
    with pytest.raises(ScoresError, match=rf"^{directory / SCORES_FILE}: scores table lacks column 'flatness'"):
        select_stage.run(cfg)


def test_stage_without_scores_says_run_score(tmp_path):
    with pytest.raises(FileNotFoundError, match="scores.parquet does not exist: run `flatspec score`"):
        select_stage.run(Config(run_dir=str(tmp_path / "run")))


flatness_values = st.one_of(st.floats(0.01, 1.0), st.just(NAN), st.sampled_from([0.25, 0.5]))


@settings(deadline=None, max_examples=200)
@given(values=st.lists(flatness_values, min_size=1, max_size=40), keep=st.floats(0.001, 1.0),
       heldout=st.integers(0, 5))
def test_sfdd_property(values, keep, heldout):
    table = scores_table(values)
    candidates = len(values) - heldout
    eligible = int(np.isfinite(values[:max(candidates, 0)]).sum())
    if candidates <= 0 or eligible == 0:
        with pytest.raises(ValueError):
            select_samples(table, "sfdd", keep, 0, heldout)
        return
    selection = select_samples(table, "sfdd", keep, 0, heldout)
    # The formula, on keep's decimal value as written: max(1, round_half_up(keep x eligible)).
    assert selection.count == max(1, math.floor(Fraction(repr(keep)) * eligible + Fraction(1, 2)))
    flatness = np.asarray(values[:candidates])
    chosen = np.zeros(candidates, bool)
    chosen[list(selection.indices)] = True
    assert not np.isnan(flatness[chosen]).any()
    rest = flatness[~chosen & np.isfinite(flatness)]
    if rest.size:
        assert flatness[chosen].min() >= rest.max()
    assert selection.cut == flatness[chosen].min()
    assert list(selection.indices) == sorted(selection.indices)
    assert all(i < candidates for i in selection.indices)


def test_the_changed_scoring_inputs_are_named():
    from flatspec_jax.stages.score import score_input_changes, score_inputs

    saved = score_inputs(Config(), "samples-a")
    assert score_input_changes(saved, score_inputs(Config(), "samples-a")) == "other settings"
    now = score_inputs(Config(score=ScoreConfig(temperature=2.0, row_length=4096)), "samples-b")
    assert score_input_changes(saved, now) == ("the tokenized samples (data.*, the data or the model files); "
                                               "score.temperature: 1.0 -> 2.0")  # row_length only cuts the work
