"""``flatspec train`` killed with SIGKILL mid-run and re-run ends exactly where an uninterrupted run ends.

Both runs use the CLI in subprocesses (one CPU device each, a shared ``FLATSPEC_CACHE_DIR`` so the
compiled step is reused) on a tiny random Llama saved as an HF directory beside SmolLM2's
tokenizer, trained on the first ShareGPT conversations with gradient accumulation, held-out
evaluation and a checkpoint every 4 steps. The killed run is SIGKILLed once it has a checkpoint
beyond step 0 *and* has logged at least two steps past it (so the resumed run must discard and
redo logged work), then re-run to completion. Checked, bitwise:

* ``metrics.jsonl``: every record (training and held-out) of every step equal, in the same order,
  except the wall-clock ``tokens_per_s``; no step logged twice;
* the final checkpoint: draft parameters, AdamW moments and step count identical;
* the data order: the data position saved with the final checkpoint is identical, and the
  losses could not match step for step if any batch had been skipped or repeated.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from flatspec_jax.config import ConfigError, load_config
from flatspec_jax.train.metrics import read_metrics
from flatspec_jax.train.optim import learning_rate_schedule
from flatspec_jax.train.resume import check_resumable
from tiny_target import cli_env, save_tiny_llama


STEPS = 24
SAVE_EVERY = 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def train_argv(run_dir: Path, tiny_dir: Path) -> list[str]:
    overrides = [f"model.path={tiny_dir}", "data.limit=40", "data.max_length=64", "data.heldout=4",
                 "data.shuffle_seed=5", "train.row_length=64", "train.batch_tokens=256", "train.grad_accum=2",
                 f"train.steps={STEPS}", f"train.save_every={SAVE_EVERY}", "train.log_every=1", "train.eval_every=6",
                 "train.warmup_steps=3", "train.learning_rate=0.002", "mesh.data=1", "seed=3"]
    return ([sys.executable, "-m", "flatspec_jax.cli", "train", "--run-dir", str(run_dir)]
            + [x for o in overrides for x in ("--set", o)])


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Finished orbax steps (a step being written lives in a temporary directory with another name)."""
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if re.fullmatch(r"\d+", p.name))


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("resume")
    env = cli_env(base / "cache")

    # Uninterrupted reference (also fills the caches: tokenizer, XLA).
    reference = base / "reference"
    done = subprocess.run(train_argv(reference, tiny_dir), check=False, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    # Killed run: SIGKILL once a checkpoint beyond step 0 exists and two more steps have been logged.
    resumed = base / "resumed"
    killed_log = base / "killed.log"
    with open(killed_log, "w") as log:  # a file, not a pipe: a full pipe would stall the child
        proc = subprocess.Popen(train_argv(resumed, tiny_dir), env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 600
    at_kill = None
    while proc.poll() is None and time.monotonic() < deadline:
        saved = checkpoint_steps(resumed)
        logged = logged_steps(resumed)
        if saved and saved[-1] > 0 and logged and logged[-1] >= saved[-1] + 2:
            proc.send_signal(signal.SIGKILL)
            at_kill = {"checkpoints": saved, "logged": logged}
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (
        f"the run ended (rc {proc.returncode}) before it could be killed; make it longer\n"
        f"{killed_log.read_text()[-3000:]}")
    after_kill = {"checkpoints": checkpoint_steps(resumed), "logged": logged_steps(resumed)}
    again = subprocess.run(train_argv(resumed, tiny_dir), check=False, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    return {"reference": reference, "resumed": resumed, "at_kill": at_kill, "after_kill": after_kill,
            "resume_log": again.stderr}


def test_run_was_killed_mid_training_and_resumed_from_a_checkpoint(runs):
    after = runs["after_kill"]
    assert after["checkpoints"] and 0 < after["checkpoints"][-1] < STEPS
    assert STEPS not in after["checkpoints"]
    # Steps past the last checkpoint were logged and lost: the resumed run must redo them.
    assert after["logged"][-1] > after["checkpoints"][-1]
    assert f"resumed from {runs['resumed'] / 'checkpoints'}/{after['checkpoints'][-1]}" in runs["resume_log"]


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def test_metrics_log_equals_uninterrupted(runs):
    want = read_metrics(runs["reference"] / "metrics.jsonl")
    got = read_metrics(runs["resumed"] / "metrics.jsonl")
    train_steps = [r["step"] for r in want]
    assert train_steps == list(range(STEPS + 1)) and all("loss" in r for r in want)  # 0: the untrained head
    assert [r["step"] for r in want if "eval_loss" in r] == [0, 6, 12, 18, 24]
    assert [r["step"] for r in got] == train_steps, "a step is missing or logged twice"
    losses = [r["loss"] for r in want]
    assert len(set(losses[1:])) == STEPS and losses[-1] < losses[0]  # real, changing training
    assert comparable(got) == comparable(want)  # bitwise: floats compared exactly


def restore_raw(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    """The saved ``state`` item (params, optimizer leaves, step) as host arrays, keyed by path."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.restore((run_dir / "checkpoints" / str(step) / "state").absolute())
    flat = {}

    def visit(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(f"{prefix}/{key}" if prefix else str(key), value)
        else:
            flat[prefix] = np.asarray(node)

    visit("", tree)
    return flat


@pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
def test_final_checkpoint_equals_uninterrupted_bitwise(runs):
    assert checkpoint_steps(runs["resumed"])[-1] == checkpoint_steps(runs["reference"])[-1] == STEPS
    want, got = restore_raw(runs["reference"], STEPS), restore_raw(runs["resumed"], STEPS)
    assert got.keys() == want.keys()
    assert any(k.startswith("params/") for k in want) and any(k.startswith("opt_state/") for k in want)
    assert int(got["step"]) == STEPS
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert got[key].tobytes() == want[key].tobytes(), f"{key} differs from the uninterrupted run"


def test_data_position_equals_uninterrupted(runs):
    def data_item(run_dir: Path) -> dict:
        return json.loads((run_dir / "checkpoints" / str(STEPS) / "data" / "metadata").read_text())

    want = data_item(runs["reference"])
    assert want == {"next_batch": STEPS * 2}  # two micro-batches per step (train.grad_accum)
    assert data_item(runs["resumed"]) == want


@pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
@pytest.mark.parametrize("signum, status, cause", [(signal.SIGTERM, 143, "preempted"),
                                                   (signal.SIGINT, 130, r"interrupted \(Ctrl-C\)")])
def test_a_stop_signal_saves_the_current_step_and_the_rerun_equals_uninterrupted(runs, tiny_dir, signum, status,
                                                                                 cause):
    """A single-process run sent SIGTERM (a scheduler's preemption) or one Ctrl-C saves the step it is at,
    whatever train.save_every says, and exits 128 + the signal instead of dying with the steps since its last
    checkpoint."""
    run_dir = runs["reference"].parent / f"stopped_{signum}"
    env = cli_env(runs["reference"].parent / "cache")
    log_path = run_dir.parent / f"stopped_{signum}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(train_argv(run_dir, tiny_dir), env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        logged = logged_steps(run_dir)
        if logged and logged[-1] % SAVE_EVERY == 1:  # past a checkpoint: the next is 3 steps away
            proc.send_signal(signum)
            break
        time.sleep(0.005)
    assert proc.wait(timeout=120) == status, log_path.read_text()[-3000:]
    match = re.search(rf"{cause} at step (\d+): saved it", log_path.read_text())
    assert match, log_path.read_text()[-3000:]
    step = int(match.group(1))
    assert step % SAVE_EVERY and checkpoint_steps(run_dir)[-1] == step < STEPS
    assert logged_steps(run_dir)[-1] == step, "no step past the saved one was logged"
    again = subprocess.run(train_argv(run_dir, tiny_dir), check=False, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resumed from {run_dir / 'checkpoints'}/{step}" in again.stderr
    assert comparable(read_metrics(run_dir / "metrics.jsonl")) == comparable(
        read_metrics(runs["reference"] / "metrics.jsonl"))
    want, got = restore_raw(runs["reference"], STEPS), restore_raw(run_dir, STEPS)
    assert all(got[key].tobytes() == want[key].tobytes() for key in want)


def test_checkpoints_with_grain_iterator_states_still_resume(tmp_path):
    """Checkpoints written before the data position was saved as JSON hold Grain's state of the same
    iterator over global batches, one file per process; the position is read from it."""
    from flatspec_jax.checkpoint.manager import DraftCheckpointer

    data = tmp_path / "checkpoints" / "8" / "data"
    data.mkdir(parents=True)
    for process in range(2):
        (data / f"process_{process}-of-2.json").write_text(json.dumps({"next_index": 16}))
    checkpointer = DraftCheckpointer(tmp_path / "checkpoints", keep=1)
    try:
        assert checkpointer._data_state(8) == {"next_batch": 16}
    finally:
        checkpointer.close()


def test_a_new_train_steps_warns_with_the_learning_rate_it_resumes_at(tmp_path, caplog):
    saved = load_config(None, ["train.steps=100", "train.warmup_steps=10", "train.schedule=cosine"])
    meta = {"config": saved.to_dict()}
    longer = load_config(None, ["train.steps=200", "train.warmup_steps=10", "train.schedule=cosine"])
    with caplog.at_level(logging.WARNING, logger="flatspec_jax.train.resume"):
        check_resumable(tmp_path, meta, longer, {}, start=100)
    assert "step 101 trains at" in caplog.text and "train.steps=200" in caplog.text
    assert f"instead of {float(learning_rate_schedule(saved.train)(100)):.3g}" in caplog.text
    caplog.clear()
    constant = ["train.schedule=constant", "train.warmup_steps=10"]
    with caplog.at_level(logging.WARNING, logger="flatspec_jax.train.resume"):
        check_resumable(tmp_path, {"config": load_config(None, ["train.steps=100", *constant]).to_dict()},
                        load_config(None, ["train.steps=200", *constant]), {}, start=100)
        check_resumable(tmp_path, meta, saved, {}, start=50)
    assert caplog.text == "", "the same learning rate needs no warning"


def test_changed_samples_name_the_setting_behind_them_or_else_the_files(tmp_path):
    saved = load_config(None, ["model.path=/models/a", "data.limit=12"])
    meta = {"config": saved.to_dict(), "inputs": {"samples": "before"}}
    moved = load_config(None, ["model.path=/models/b", "data.limit=12"])
    with pytest.raises(ConfigError, match=r"the tokenized samples \(model\.path: '/models/a' -> '/models/b'\)"):
        check_resumable(tmp_path, meta, moved, {"samples": "after"}, start=4)
    with pytest.raises(ConfigError, match=r"the tokenized samples \(the contents of the data or model files"):
        check_resumable(tmp_path, meta, saved, {"samples": "after"}, start=4)


def test_samples_left_out_for_nothing_to_train_are_compared_and_an_older_checkpoint_is_warned_about(tmp_path,
                                                                                                   caplog):
    cfg = load_config(None, ["data.limit=12"])
    now = {"samples": "s", "selection": None, "left_out": 2}
    with caplog.at_level(logging.WARNING, logger="flatspec_jax.train.resume"):
        check_resumable(tmp_path, {"config": cfg.to_dict(), "inputs": {"samples": "s", "selection": None}}, cfg,
                        now, start=4)
    assert "was written before training left out samples" in caplog.text and "2 such samples" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flatspec_jax.train.resume"):
        check_resumable(tmp_path, {"config": cfg.to_dict(), "inputs": now}, cfg, now, start=4)
    assert caplog.text == ""
    with pytest.raises(ConfigError, match=r"the samples left out for nothing to train within train\.row_length "
                                          r"\(1 -> 2\)"):
        check_resumable(tmp_path, {"config": cfg.to_dict(), "inputs": {**now, "left_out": 1}}, cfg, now, start=4)
