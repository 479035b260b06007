"""``profile.*``: jax.profiler traces of chosen steps of `score` and `train`, and nothing otherwise."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from flatspec_jax.config import ConfigError, load_config
from flatspec_jax.profiling import StepProfiler
from flatspec_jax.stages import score, train
from flatspec_jax.stages.common import RunContext
from flatspec_jax.train.resume import setting_changes
from tiny_target import save_tiny_llama, tiny_run_overrides


def traced_steps(directory: Path, name: str) -> list[int]:
    """The step numbers annotated ``name`` in the one trace under ``directory``."""
    traces = list(directory.glob("plugins/profile/*/*.trace.json.gz"))
    assert len(traces) == 1, traces
    assert list(directory.glob("plugins/profile/*/*.xplane.pb")), "no xplane.pb for XProf / TensorBoard"
    events = json.loads(gzip.decompress(traces[0].read_bytes()))["traceEvents"]
    return sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == name)


def run_steps(profiler: StepProfiler, count: int) -> None:
    double = jax.jit(lambda x: x * 2)
    x = jnp.ones(4)
    with profiler:
        for number in range(1, count + 1):
            with profiler.step(number):
                x = double(x)
            profiler.step_done(number, x)


def test_only_the_chosen_steps_are_traced(tmp_path):
    run_steps(StepProfiler(tmp_path / "trace", first=2, count=2, name="demo"), count=5)
    assert traced_steps(tmp_path / "trace", "demo") == [2, 3]


def test_no_steps_means_no_trace(tmp_path):
    run_steps(StepProfiler(tmp_path / "trace", first=1, count=0, name="demo"), count=3)
    run_steps(StepProfiler(None, first=1, count=3, name="demo"), count=3)
    assert not (tmp_path / "trace").exists()


def test_a_loop_that_ends_before_the_last_traced_step_still_writes_its_trace(tmp_path):
    run_steps(StepProfiler(tmp_path / "short", first=2, count=10, name="demo"), count=3)
    assert traced_steps(tmp_path / "short", "demo") == [2, 3]
    run_steps(StepProfiler(tmp_path / "next", first=1, count=1, name="demo"), count=1)  # the profiler was released
    assert traced_steps(tmp_path / "next", "demo") == [1]


def test_profile_settings_are_validated():
    with pytest.raises(ConfigError, match="profile.start"):
        load_config(None, ["profile.start=0"])
    with pytest.raises(ConfigError, match="profile.steps"):
        load_config(None, ["profile.steps=-1"])


def test_a_run_resumes_with_other_profile_settings():
    saved = {"config": load_config(None, []).to_dict()}
    assert setting_changes(saved, load_config(None, ["profile.steps=3", "profile.start=5"])) == []


def test_score_and_train_trace_their_chosen_steps(tmp_path):
    tiny_dir = save_tiny_llama(tmp_path / "tiny_llama")
    run_dir = tmp_path / "run"
    cfg = load_config(None, tiny_run_overrides(tiny_dir, run_dir, "profile.steps=1", "profile.start=2"))
    ctx = RunContext(cfg)
    score.run(cfg, ctx=ctx)
    train.run(cfg, ctx=ctx)
    assert traced_steps(run_dir / "profile" / "score", "score") == [2]
    assert traced_steps(run_dir / "profile" / "train", "train") == [2]
