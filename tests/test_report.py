"""Tests for flatspec_jax.report and the ``flatspec report`` stage on a fake run directory."""

from __future__ import annotations

import json
import logging
import re
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.image import imread

from flatspec_jax import report
from flatspec_jax.train.metrics import read_metrics
from flatspec_jax.config import Config, DataConfig, SelectConfig
from flatspec_jax.selection import select_samples, write_manifest
from flatspec_jax.stages import report as report_stage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCORE_PLOTS = {"flatness_histogram.png", "flatness_vs_entropy.png", "position_flatness.png"}
METRIC_PLOTS = {"training_loss.png", "learning_rate.png", "agreement.png", "throughput.png"}


def write_scores(path, n=300, length=128, seed=0, position_stats=True):
    rng = np.random.default_rng(seed)
    flatness = rng.beta(2, 8, n)
    entropy = 6 * flatness + rng.normal(0, 0.3, n)
    n_trained = rng.integers(20, 100, n)
    n_trained[:5] = 0
    flatness[:5] = entropy[:5] = np.nan
    table = pa.table({"id": [f"conv-{i}" for i in range(n)], "n_tokens": n_trained + 30,
                      "n_trained_tokens": n_trained, "flatness": flatness, "flatness_all": flatness,
                      "entropy": entropy, "top1_prob": 1 - flatness, "nll": entropy / 2,
                      "config_hash": ["f" * 16] * n})
    counts = np.maximum(n - np.arange(length) * 2, 0)
    sums = counts * (0.15 + 0.05 * np.sin(np.arange(length) / 10))
    metadata = {b"flatspec_fingerprint": b"f" * 16, b"padding_fraction": b"0.012000"}
    if position_stats:
        metadata[b"flatspec_position_flatness"] = json.dumps([sums.tolist(), counts.tolist()]).encode()
    pq.write_table(table.replace_schema_metadata(metadata), path)
    return table


def write_metrics(path, steps=60):
    lines = []
    for step in range(1, steps + 1):
        lr = 3e-5 * min(1.0, step / 10) * 0.5 * (1 + np.cos(np.pi * step / steps))
        loss_feature, loss_token = 2.0 / step ** 0.5, 3.0 / step ** 0.3
        top1 = 0.75 - 0.5 / step ** 0.3
        lines.append(json.dumps({"step": step, "loss": loss_feature + 0.1 * loss_token, "loss_feature": loss_feature,
                                 "loss_token": loss_token, "lr": lr, "acceptance": 1 - 0.8 / step ** 0.2,
                                 "top1": top1, "top3": top1 + 0.1, "grad_norm": 1.0, "tokens_per_s": 5000.0 + step}))
        if step % 10 == 0:  # held-out evaluation, as train.loop writes it
            lines.append(json.dumps({"step": step, "eval_loss": 1.1 * (loss_feature + 0.1 * loss_token),
                                     "eval_loss_feature": 1.1 * loss_feature, "eval_loss_token": 1.1 * loss_token,
                                     "eval_acceptance": 0.9 - 0.8 / step ** 0.2, "eval_top1": top1 - 0.05,
                                     "eval_top3": top1 + 0.05}))
    path.write_text("\n".join(lines) + '\n{"step": 61, "loss": 0.4')  # killed mid-line


@pytest.fixture
def full_run(tmp_path):
    table = write_scores(tmp_path / "scores.parquet")
    selection = select_samples(table, "sfdd", 0.3, 0, heldout=16)
    write_manifest(tmp_path / "selection.json", selection, tmp_path / "scores.parquet")
    write_metrics(tmp_path / "metrics.jsonl")
    (tmp_path / "eval.json").write_text(json.dumps({
        "per_depth_acceptance": [0.81, 0.62, 0.45, 0.31, 0.0], "per_depth_proposed": [90, 70, 40, 12, 0],
        "tau": 3.39, "speedup": 2.41}))
    return tmp_path


def config(directory) -> Config:
    return Config(run_dir=str(directory), select=SelectConfig(keep=0.3), data=DataConfig(heldout=16))


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 400 and height >= 300 and len(data) > 10_000, (path, width, height, len(data))
    image = imread(path)
    assert image.shape[:2] == (height, width)
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_full_run_writes_every_plot(full_run, caplog):
    with caplog.at_level(logging.INFO):
        written = report_stage.run(config(full_run))
    names = {p.name for p in written}
    assert names == SCORE_PLOTS | METRIC_PLOTS | {"depth_acceptance.png"}
    assert {p.name for p in (full_run / "plots").iterdir()} == names  # no temporary files left
    for path in written:
        assert path.parent == full_run / "plots"
        assert_png(path)
    assert "skipped 1 incomplete or invalid line(s) (line 67)" in caplog.text
    assert "report: wrote 8 plot(s)" in caplog.text


def test_scores_only_run_writes_only_score_plots(tmp_path):
    write_scores(tmp_path / "scores.parquet")
    written = report_stage.run(config(tmp_path))
    assert {p.name for p in written} == SCORE_PLOTS
    for path in written:
        assert_png(path)


def test_stale_manifest_and_missing_position_stats_are_skipped(tmp_path, caplog):
    table = write_scores(tmp_path / "scores.parquet", position_stats=False)
    write_manifest(tmp_path / "selection.json", select_samples(table, "sfdd", 0.3, 0, 16), tmp_path / "scores.parquet")
    write_scores(tmp_path / "scores.parquet", seed=1, position_stats=False)  # re-scored: the manifest is stale
    with caplog.at_level(logging.WARNING):
        written = report_stage.run(config(tmp_path))
    assert {p.name for p in written} == {"flatness_histogram.png", "flatness_vs_entropy.png"}
    assert "made from other scores" in caplog.text and "token-flatness-by-position" in caplog.text


def test_scores_without_a_column_skip_the_score_plots_naming_file_and_column(full_run, caplog):
    table = pq.read_table(full_run / "scores.parquet")
    pq.write_table(table.drop(["entropy"]), full_run / "scores.parquet")
    with caplog.at_level(logging.WARNING):
        written = report_stage.run(config(full_run))
    assert {p.name for p in written} == METRIC_PLOTS | {"depth_acceptance.png"}
    assert f"no score plots: {full_run / 'scores.parquet'} lacks column 'entropy'" in caplog.text


def test_empty_and_missing_run_dirs(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert report_stage.run(config(tmp_path)) == []
    assert "nothing to plot" in caplog.text
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report_stage.run(config(tmp_path / "absent"))


@pytest.mark.parametrize("verb", ["report", "select"])
def test_a_verb_that_reads_a_run_refuses_a_missing_run_directory_without_making_it(tmp_path, capsys, verb):
    """A mistyped --run-dir: one line, status 1, and no directory (the lock would have made one)."""
    from flatspec_jax import cli

    absent = tmp_path / "tpyo"
    assert cli.main([verb, "--run-dir", str(absent)]) == 1
    assert re.search(rf"flatspec {verb}: FileNotFoundError: run directory {absent} does not exist",
                     capsys.readouterr().err)
    assert not absent.exists()


def test_read_metrics_skips_truncated_line_and_keeps_last_repeat(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n'
                    '{"step": 2, "loss": 1.5, "lr": 1e-5}\n\n{"step": 3, "lo')
    records = read_metrics(path)
    assert len(records) == 3
    steps, values = report.metric_series(records, "loss")
    assert steps.tolist() == [1, 2] and values.tolist() == [3.0, 1.5]
    assert report.metric_keys(records) == ["loss", "lr"]
    assert report.agreement_keys([{"step": 1, "eval_top10": 0.9, "eval_top3": 0.5, "eval_top1": 0.2, "top1": 0.3}]) == [
        "top1", "top3", "top10"]
    assert report.loss_keys([{"step": 1, "eval_loss": 1.0, "eval_loss_token": 2.0}]) == ["loss", "loss_token"]
    unrolled = [{"step": 1, "top1": 0.3, "depth2_top1": 0.2, "depth2_loss_token": 3.0, "eval_depth10_top1": 0.1,
                 "eval_depth3_top1": 0.15, "depth3_top3": 0.4}]
    assert report.agreement_keys(unrolled) == ["top1"]
    assert report.later_draft_keys(unrolled) == ["depth2_top1", "depth3_top1", "depth10_top1"]
    assert report.loss_keys([{"step": 1, "loss": 1.0, "depth2_loss_token": 3.0}]) == ["loss"]


def test_plot_functions_validate_inputs(tmp_path):
    with pytest.raises(ValueError, match="no finite sample flatness"):
        report.plot_flatness_histogram([np.nan], tmp_path / "h.png")
    with pytest.raises(ValueError, match="shape \\[2, L\\]"):
        report.plot_position_flatness(np.zeros((3, 4)), tmp_path / "p.png")
    with pytest.raises(ValueError, match="per_depth_acceptance"):
        report.plot_depth_acceptance({"tau": 2.0}, tmp_path / "d.png")
    with pytest.raises(ValueError, match="no loss"):
        report.plot_training_loss([{"step": 1, "lr": 0.1}], tmp_path / "l.png")
    assert not list(tmp_path.iterdir())


def test_smoothed_position_mean_is_count_weighted():
    sums, counts = np.array([1.0, 0.0, 9.0]), np.array([1.0, 0.0, 3.0])
    smoothed = report.smoothed_position_mean(sums, counts, 3)
    assert smoothed.tolist() == [1.0, 2.5, 3.0]


def test_agreement_plot_draws_the_later_drafts_of_an_unrolled_run(tmp_path, monkeypatch):
    records = [{"step": s, "top1": 0.1 + s / 100, "top3": 0.2 + s / 100, "acceptance": 0.1, "depth2_top1": s / 120,
                **({"eval_top1": 0.1, "eval_depth2_top1": s / 130} if s % 10 == 0 else {})} for s in range(1, 41)]
    labels = []
    original = report._train_and_heldout

    def spy(ax, records, keys, label, *args):
        labels.extend(label(k) for k in keys)
        return original(ax, records, keys, label, *args)

    monkeypatch.setattr(report, "_train_and_heldout", spy)
    assert_png(report.plot_agreement(records, tmp_path / "agreement.png"))
    assert labels == ["top-1 agreement", "top-3 agreement", "acceptance Σ min(p, q)",
                      "draft 2 top-1 agreement (from its own drafts)"]


def test_a_diverged_run_is_named_and_its_unplottable_curves_leave_no_old_plot(tmp_path, caplog):
    """A loss that turned NaN is warned about with its first step; a metric that is NaN throughout cannot be
    drawn, and the plot an earlier report drew from these metrics is removed rather than left as current."""
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "training_loss.png").write_bytes(PNG_SIGNATURE + b"an earlier, healthy curve")
    records = [{"step": step, "loss": float("nan"), "lr": 1e-3, "tokens_per_s": 100.0 + step} for step in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with caplog.at_level(logging.INFO):
        written = report_stage.run(config(tmp_path))
    assert {p.name for p in written} == {"learning_rate.png", "throughput.png"}
    assert re.search(r"metrics\.jsonl: loss is NaN or infinite from step 1 on \(did the training diverge\?\)",
                     caplog.text)
    assert not (tmp_path / "plots" / "training_loss.png").exists()


def test_a_metric_logged_at_one_step_is_still_drawn(tmp_path):
    """log_every above train.steps logs lr once; a line through one point would leave the plot empty."""
    path = report.plot_learning_rate([{"step": 2, "lr": 1e-3}], tmp_path / "learning_rate.png")
    pixels = imread(path)[..., :3]
    purple = np.array([0x94, 0x67, 0xBD]) / 255  # tab:purple
    assert np.sum(np.all(np.abs(pixels - purple) < 0.05, axis=-1)) > 10


def test_an_unreadable_scores_file_skips_only_its_plots_and_an_empty_metrics_file_is_named(tmp_path, caplog):
    (tmp_path / "scores.parquet").write_bytes(b"PAR1 cut")
    write_metrics(tmp_path / "metrics.jsonl")
    with caplog.at_level(logging.WARNING):
        written = report_stage.run(config(tmp_path))
    assert {p.name for p in written} == METRIC_PLOTS
    assert re.search(r"no score plots: cannot read .*scores\.parquet", caplog.text)
    (tmp_path / "metrics.jsonl").write_text("")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert report_stage.run(config(tmp_path)) == []
    assert "nothing to plot in" in caplog.text
    assert "scores.parquet, metrics.jsonl hold(s) nothing it can draw" in caplog.text
