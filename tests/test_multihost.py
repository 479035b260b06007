"""Two JAX processes on localhost (CPU, gloo collectives) give the single-process results.

``flatspec score``, ``select``, ``train`` (5 steps, 3 scoring batches), ``eval`` (2 MT-bench
questions, greedy tree decoding) and ``pipeline`` (over the finished run: every stage current
but the report) run through the CLI (``flatspec_jax.cli.main`` with ``--set`` overrides, in
``multihost_worker.py`` subprocesses: one per JAX process, the five verbs one after the other
with a barrier between them, as separate invocations would) twice, on a tiny
random Llama (an HF directory with SmolLM2's tokenizer) and the same ``data=2, fsdp=4`` mesh:

* single process, 8 fake CPU devices;
* 2 processes x 4 fake CPU devices, joined through ``JAX_COORDINATOR_ADDRESS`` /
  ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (``runtime.initialize_distributed`` selects gloo).

Both chains run concurrently (about 2 min on 2 loaded CPU cores). Checked: the scores parquet,
the selection, the per-step training metrics (loss terms, gradient norm, held-out metrics) and
the saved draft head agree to 1e-5, the evaluation's acceptance counts and output lengths
exactly; the pipeline redoes nothing; only process 0 writes logs, scores, manifests, tokenized
samples, metrics, ``eval.json`` and the plots (process 1 writes nothing but its share of the
orbax checkpoint, seen through an audit hook, see ``multihost_worker.py``), and process 1 logs
nothing at INFO. Every subprocess
is killed on failure or timeout.

A third job (2 processes) meets a run directory another command has locked: every process
refuses and exits, none runs the verb alone. Two more are sent SIGTERM (to process 1) during
``score`` and ``train``: both processes stop at the point they agree on, exit 143, and the same
command finishes from the saved parts or step.

Training runs with the default feature noise: it depends on a row's position in the global
batch, so the losses match only because every row lands at the same position whatever the
process count (``test_global_batches_do_not_depend_on_the_process_count``).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from flax import nnx

from flatspec_jax.checkpoint.manager import flatten_params, load_draft_head, read_meta
from flatspec_jax.config import MeshConfig
from flatspec_jax.data.pipeline import plan_training_rows, training_iterator
from flatspec_jax.data.tokenized import TokenizedDataset
from flatspec_jax.scoring import STAT_COLUMNS
from flatspec_jax.sharding import ShardingRules, batch_sharding, make_mesh, process_rows
from flatspec_jax.weights.arch import ArchSpec
from tiny_target import save_tiny_llama

WORKER = Path(__file__).with_name("multihost_worker.py")
TOL = 1e-5
PROCESSES = 2
DEVICES = 8
TIME_LIMIT_S = 200.0
"""Both chains together; past it every subprocess is killed and the test fails."""
"""See the module docstring: the pipeline's row order makes noisy training depend on the process count."""
SETTINGS = [
    "data.limit=40", "data.max_length=64", "data.heldout=4", "data.selection=run", "select.keep=0.75",
    "score.row_length=64", "score.rows_per_batch=8", "train.row_length=64", "train.batch_tokens=512",
    "train.steps=5", "train.log_every=1", "mesh.data=2", "mesh.fsdp=4",
    "eval.limit=2", "decode.max_new_tokens=12", "decode.depth=2", "decode.top_k=2", "decode.total_tokens=5",
]
VERBS = ("score", "select", "train", "eval", "pipeline")
"""The last, over the finished run, skips every stage but the report (plots) and prints the summary."""


# ----------------------------------------------------------------------------------------------
# The tiny target and the runs
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Aborted(RuntimeError):
    """The other chain failed; this one stopped early."""


class Chain:
    """score, select, train and eval, one after the other, in ``processes`` worker processes (one per rank)."""

    def __init__(self, name: str, processes: int, run_dir: Path, model_dir: Path, logs: Path, abort: threading.Event,
                 deadline: float):
        self.name, self.processes, self.run_dir, self.model_dir = name, processes, run_dir, model_dir
        self.logs, self.abort, self.deadline = logs, abort, deadline
        self.procs: list[subprocess.Popen] = []
        self.lock = threading.Lock()

    def env(self, rank: int, port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
        env.update(JAX_PLATFORMS="cpu", FLATSPEC_CACHE_DIR=str(self.logs / f"cache-{self.name}"),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES // self.processes}",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        if self.processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(self.processes),
                       JAX_PROCESS_ID=str(rank))
        return env

    def command(self) -> list[str]:
        args = []
        for verb in VERBS:
            args += ["--then"] * bool(args) + [verb, "--run-dir", str(self.run_dir), "--set",
                                               f"model.path={self.model_dir}"]
            for setting in SETTINGS:
                args += ["--set", setting]
        return args

    def run(self) -> float:
        port = free_port()
        start = time.monotonic()
        with self.lock:
            if self.abort.is_set():
                raise Aborted(self.name)
            for rank in range(self.processes):
                with open(self.logs / f"{self.name}-{rank}.err", "w") as err:
                    self.procs.append(subprocess.Popen(
                        [sys.executable, str(WORKER), str(self.logs / f"{self.name}-{rank}.audit"), *self.command()],
                        env=self.env(rank, port), stdout=subprocess.DEVNULL, stderr=err, cwd=self.logs))
        while any(p.poll() is None for p in self.procs):
            # A failed rank leaves the others waiting in collectives: stop them all at once.
            if (any(p.poll() not in (None, 0) for p in self.procs) or self.abort.is_set()
                    or time.monotonic() > self.deadline):
                break
            time.sleep(0.2)
        self.kill()
        codes = [p.returncode for p in self.procs]
        if any(codes):
            if self.abort.is_set() and all(c in (0, -9) for c in codes):
                raise Aborted(self.name)
            timed_out = f" (killed after the {TIME_LIMIT_S:.0f} s limit)" if time.monotonic() > self.deadline else ""
            tails = "\n".join(f"--- rank {r} (exit {c}):\n" + (self.logs / f"{self.name}-{r}.err").read_text()[-3000:]
                              for r, c in enumerate(codes))
            raise RuntimeError(f"{self.name}: flatspec {' / '.join(VERBS)} failed{timed_out}\n{tails}")
        return time.monotonic() - start

    def kill(self) -> None:
        with self.lock:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
            for proc in self.procs:
                proc.wait()


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    abort = threading.Event()
    deadline = time.monotonic() + TIME_LIMIT_S
    chains = {name: Chain(name, processes, base / name, tiny_dir, base, abort, deadline)
              for name, processes in (("single", 1), ("multi", PROCESSES))}
    try:
        with concurrent.futures.ThreadPoolExecutor(len(chains)) as pool:
            futures = {name: pool.submit(chain.run) for name, chain in chains.items()}
            errors = []
            for future in concurrent.futures.as_completed(futures.values()):
                try:
                    future.result()
                except Exception as err:  # noqa: BLE001 - stop the other chain, then report
                    abort.set()
                    if not isinstance(err, Aborted):
                        errors.append(err)
            if errors:
                raise errors[0]
            timings = {name: round(f.result(), 1) for name, f in futures.items()}
    finally:
        abort.set()
        for chain in chains.values():
            chain.kill()
    print(f"multihost wall times (s): {timings}")
    return {"single": base / "single", "multi": base / "multi", "logs": base, "timings": timings}


# ----------------------------------------------------------------------------------------------
# Results agree
# ----------------------------------------------------------------------------------------------


def test_scores_match_the_single_process_run(runs):
    single = pq.read_table(runs["single"] / "scores.parquet").to_pydict()
    multi = pq.read_table(runs["multi"] / "scores.parquet").to_pydict()
    assert single["id"] == multi["id"] and len(single["id"]) > 8
    assert single["n_tokens"] == multi["n_tokens"] and single["n_trained_tokens"] == multi["n_trained_tokens"]
    for name in STAT_COLUMNS:
        np.testing.assert_allclose(multi[name], single[name], rtol=TOL, atol=TOL, equal_nan=True, err_msg=name)


def test_selection_matches_the_single_process_run(runs):
    single = json.loads((runs["single"] / "selection.json").read_text())
    multi = json.loads((runs["multi"] / "selection.json").read_text())
    assert single["ids"] == multi["ids"] and single["count"] == multi["count"] > 0


def read_records(run_dir: Path) -> dict[tuple[int, bool], dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {(r["step"], "eval_loss" in r): r for r in records}


def test_training_metrics_match_the_single_process_run(runs):
    single, multi = read_records(runs["single"]), read_records(runs["multi"])
    assert sorted(single) == sorted(multi) == [(0, True), (1, False), (2, False), (3, False), (4, False), (5, True)]
    for key, want in single.items():
        got = multi[key]
        names = [n for n in want if n.startswith(("loss", "eval_", "grad_norm", "acceptance", "top")) or n == "tokens"]
        assert names and set(names) <= set(got) and ("tokens" in names) == (key[0] > 0)
        for name in names:
            np.testing.assert_allclose(got[name], want[name], rtol=TOL, atol=TOL, err_msg=f"step {key}: {name}")
        assert got.get("lr") == want.get("lr")


def test_saved_draft_heads_match(runs):
    heads = {}
    for name in ("single", "multi"):
        directory = runs[name] / "checkpoints"
        step, meta = read_meta(directory)
        assert step == 5
        target = ArchSpec.from_json(json.dumps(meta["target_arch"]), str(directory))
        mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
        head = load_draft_head(directory, target, meta["target_vocab_hash"], mesh, ShardingRules())
        heads[name] = {k: np.asarray(v.get_value()) for k, v in flatten_params(nnx.state(head)).items()}
    assert heads["single"].keys() == heads["multi"].keys()
    for key, want in heads["single"].items():
        np.testing.assert_allclose(heads["multi"][key], want, rtol=TOL, atol=TOL, err_msg=key)


def test_evaluation_matches_the_single_process_run(runs):
    """Greedy tree decoding with the target and head sharded over both processes: the same output
    lengths, acceptance counts and tau (the 5-step head on a random target accepts little or
    nothing; what is checked is that decoding runs across processes and agrees)."""
    single = json.loads((runs["single"] / "eval.json").read_text())
    multi = json.loads((runs["multi"] / "eval.json").read_text())
    assert single["turns"] == multi["turns"] == 2 and single["method"] == multi["method"] == "tree"
    assert single["same_output_fraction"] == multi["same_output_fraction"] == 1.0
    for name in ("tau", "accept_histogram", "tokens_ar", "tokens_spec", "per_depth_acceptance"):
        assert multi[name] == single[name], name
    for want, got in zip(single["questions"], multi["questions"]):
        assert (got["prompt_id"], got["rounds"], got["accept_counts"]) == (
            want["prompt_id"], want["rounds"], want["accept_counts"])


# ----------------------------------------------------------------------------------------------
# Only process 0 writes
# ----------------------------------------------------------------------------------------------


def audited(logs: Path, rank: int, run_dir: Path) -> dict[str, set[str]]:
    """verb -> paths under run_dir (relative) that one process of the multi-process chain wrote."""
    root = str(run_dir.resolve()) + os.sep
    out: dict[str, set[str]] = {}
    for line in (logs / f"multi-{rank}.audit").read_text().splitlines():
        verb, _, path = json.loads(line)
        if path.startswith(root):
            out.setdefault(verb, set()).add(os.path.relpath(path, run_dir.resolve()))
    return out


def test_only_process_zero_writes_outputs_and_logs(runs):
    logs, run_dir = runs["logs"], runs["multi"]
    rank0, rank1 = audited(logs, 0, run_dir), audited(logs, 1, run_dir)
    # The audit sees the writes: process 0 wrote every output, each in its stage ...
    assert {"tokens.npz", "scores.parquet"} <= rank0["score"], sorted(rank0["score"])
    assert "selection.json" in rank0["select"] and "metrics.jsonl" in rank0["train"] and "eval.json" in rank0["eval"]
    # The pipeline over the finished run rewrote nothing but the plots (and took the run's lock).
    plots = {p for p in rank0["pipeline"] if p.startswith("plots" + os.sep)}
    assert plots and rank0["pipeline"] - plots == {".flatspec.lock"}, sorted(rank0["pipeline"])
    # ... and process 1 wrote nothing but its share of the orbax checkpoint.
    assert set(rank1) == {"train"}, {verb: sorted(paths) for verb, paths in rank1.items()}
    assert rank1["train"] and all(p.startswith("checkpoints" + os.sep) for p in rank1["train"]), sorted(rank1["train"])
    err0, err1 = (logs / "multi-0.err").read_text(), (logs / "multi-1.err").read_text()
    assert " INFO " not in err1 and "step/s" not in err1 and "sample/s" not in err1, err1[-3000:]
    assert "JAX process 0 of 2 (4 local devices)" in err0 and "wrote" in err0


# ----------------------------------------------------------------------------------------------
# The data pipeline's global batches (pure Python, no subprocess)
# ----------------------------------------------------------------------------------------------


def test_global_batches_do_not_depend_on_the_process_count(monkeypatch):
    rng = np.random.default_rng(0)
    samples = [(f"s{i}", rng.integers(0, 1000, 64), np.ones(64, np.int8), False) for i in range(24)]
    dataset = TokenizedDataset.from_samples(samples, "synthetic")
    rows = plan_training_rows(dataset, np.arange(24), 64)
    kwargs = {"row_length": 64, "global_rows_per_batch": 8, "seed": 0}

    mesh = make_mesh(MeshConfig(data=2, fsdp=4), jax.devices()[:DEVICES])
    sharding = batch_sharding(mesh, ShardingRules(), 1)

    def batches(count: int, index: int, num: int = 3) -> list[np.ndarray]:
        monkeypatch.setattr(jax, "process_count", lambda: count)
        positions = process_rows(sharding, (8,), lambda d: d.id * count // DEVICES, index) if count > 1 else None
        iterator = training_iterator(dataset, rows, **kwargs, positions=positions)
        return [next(iterator)["tokens"] for _ in range(num)]

    single = batches(1, 0)
    per_process = [batches(2, p) for p in range(2)]
    for b in range(3):
        # Here process p's devices hold the p-th block of the global array (make_array_from_process_local_data).
        np.testing.assert_array_equal(np.concatenate([per_process[0][b], per_process[1][b]]), single[b])


# ----------------------------------------------------------------------------------------------
# Refusals reach every process
# ----------------------------------------------------------------------------------------------

CLI = "import sys; from flatspec_jax.cli import main; sys.exit(main(sys.argv[1:]))"


def job_env(rank: int, port: int, devices_per_process: int, tmp_path: Path) -> dict[str, str]:
    """The environment of process ``rank`` of a PROCESSES-process job on localhost (coordinator at ``port``)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": str(PROCESSES), "JAX_PROCESS_ID": str(rank),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
            "FLATSPEC_CACHE_DIR": str(tmp_path / "cache")}


def run_job(argv: list[str], tmp_path: Path, devices_per_process: int) -> tuple[list[int], list[str], list[str]]:
    """``python argv`` as a job of PROCESSES processes on localhost; their exit codes, stdouts and stderrs
    (every process killed after 120 s)."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, *argv], env=job_env(rank, port, devices_per_process, tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(PROCESSES)]
    try:
        outputs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    return [proc.returncode for proc in procs], [out for out, _ in outputs], [err for _, err in outputs]


def test_a_busy_run_directory_is_refused_by_every_process_and_they_exit(tiny_dir, tmp_path):
    """Process 0 takes the run directory's lock; when another command holds it, every process must
    refuse (process 1 would otherwise run the verb alone into a collective) and leave at once."""
    import fcntl

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".flatspec.lock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("4242")
        holder.flush()
        codes, _, errors = run_job(["-c", CLI, "select", "--run-dir", str(run_dir), "--set", f"model.path={tiny_dir}"],
                                   tmp_path, 1)
    assert codes == [1, 1], errors
    assert "in use by another flatspec process (pid 4242)" in errors[0], errors[0]
    assert "could not be locked by JAX process 0" in errors[1], errors[1]


def test_a_new_selection_beside_trained_checkpoints_is_refused_by_every_process(runs, tiny_dir, tmp_path):
    """`select` with other select.* settings over a trained run reads the checkpoints on every process (opening
    them is a collective: read by process 0 alone, the job hung) and every process refuses."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(runs["multi"], run_dir)
    settings = [x for s in [*SETTINGS, "select.keep=0.5", f"model.path={tiny_dir}"] for x in ("--set", s)]
    codes, _, errors = run_job(["-c", CLI, "select", "--run-dir", str(run_dir), *settings], tmp_path,
                               DEVICES // PROCESSES)
    assert codes == [1, 1], errors
    assert "holds a draft trained on another selection" in errors[0], errors[0]


INTERLEAVED = """
import sys
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from flatspec_jax.runtime import initialize_distributed
from flatspec_jax.config import DistributedConfig
from flatspec_jax.sharding import process_rows

initialize_distributed(DistributedConfig())
devices = sorted(jax.devices(), key=lambda d: d.id)
# Process 0's devices at mesh positions 0, 2, 4, 6: its rows are spread over the batch (a torus layout).
order = [devices[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)]
mesh = Mesh(np.asarray(order).reshape(8), ("data",))
sharding = NamedSharding(mesh, PartitionSpec("data"))
batch = np.arange(16 * 3).reshape(16, 3)
local = process_rows(sharding, batch.shape)
array = jax.make_array_from_process_local_data(sharding, batch[local], batch.shape)
assert np.array_equal(multihost_utils.process_allgather(array, tiled=True), batch)
print("rows of process", jax.process_index(), local.tolist())
"""


def test_rows_spread_over_the_batch_assemble_the_global_array_in_two_processes(tmp_path):
    """Two real processes whose devices interleave along the batch axis feed their own rows and the global
    array is the batch (jax.make_array_from_process_local_data, as scoring and training call it)."""
    codes, outs, errors = run_job(["-c", INTERLEAVED], tmp_path, DEVICES // PROCESSES)
    assert codes == [0, 0], [err[-2000:] for err in errors]
    rows = [line for out in outs for line in out.splitlines() if line.startswith("rows of process")]
    assert rows == ["rows of process 0 [0, 1, 4, 5, 8, 9, 12, 13]", "rows of process 1 [2, 3, 6, 7, 10, 11, 14, 15]"]


# ----------------------------------------------------------------------------------------------
# Preemption: SIGTERM to one process of the job
# ----------------------------------------------------------------------------------------------


def preempted_job(verb: str, settings: list[str], tmp_path: Path) -> tuple[list[str], list[int], list[str]]:
    """``flatspec verb`` as a job of PROCESSES processes, process 1 sent SIGTERM once the job has joined
    (JAX's notifier then holds the signal) and before the verb's loop begins; the verb's argv (to re-run
    it), the exit codes and the stderrs."""
    import signal

    argv = ["-c", CLI, verb, "--run-dir", str(tmp_path / "run"), *[x for s in settings for x in ("--set", s)]]
    port = free_port()
    procs, logs = [], [tmp_path / f"{verb}-rank{rank}.err" for rank in range(PROCESSES)]
    for rank, log_path in enumerate(logs):
        env = job_env(rank, port, DEVICES // PROCESSES, tmp_path)
        with open(log_path, "w") as err:
            procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.DEVNULL, stderr=err))
    try:
        deadline = time.monotonic() + 120
        # Process 0 builds the mesh after every process joined and JAX's notifier took SIGTERM (at the join).
        while "stages.common: mesh {" not in logs[0].read_text() and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [log.read_text()[-2000:] for log in logs]
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    return argv, codes, [log.read_text() for log in logs]


def test_sigterm_to_one_process_stops_scoring_on_every_process_and_a_rerun_finishes(tiny_dir, tmp_path):
    """In a multi-process job SIGTERM reaches JAX's preemption notifier, not the process: the signalled
    process and the other agree on a part boundary, both exit 143 (as the signal would have) keeping the
    parts written before it, and the same command then finishes from them."""
    run_dir = tmp_path / "run"
    settings = [s for s in SETTINGS if not s.startswith("data.limit=")]
    settings += ["data.limit=160", "score.flush_every=1", f"model.path={tiny_dir}"]  # several parts of one batch
    argv, codes, errors = preempted_job("score", settings, tmp_path)
    assert codes == [143, 143], [err[-2000:] for err in errors]
    assert "preempted while scoring" in errors[0], errors[0][-2000:]
    parts = sorted((run_dir / "scores.parquet.parts").glob("part-*.parquet"))
    assert parts and not (run_dir / "scores.parquet").exists()
    match = re.search(r"scoring (\d+) samples in (\d+) batches", errors[0])
    assert match and len(parts) < int(match.group(2)), errors[0][-2000:]

    codes, _, errors = run_job(argv, tmp_path, DEVICES // PROCESSES)
    assert codes == [0, 0], [err[-2000:] for err in errors]
    assert f"resuming: {len(parts)} of" in errors[0]
    assert pq.read_table(run_dir / "scores.parquet").num_rows == int(match.group(1))


def test_sigterm_to_one_process_saves_the_agreed_training_step_and_a_rerun_resumes_from_it(tiny_dir, tmp_path):
    """The same for training: every process saves the step they agree on (one past the step they had
    reported), exits 143, and the same command resumes there and finishes."""
    settings = [s for s in SETTINGS if not s.startswith("data.selection=")]
    settings += ["data.selection=null", "train.save_every=100", f"model.path={tiny_dir}"]
    argv, codes, errors = preempted_job("train", settings, tmp_path)
    assert codes == [143, 143], [err[-2000:] for err in errors]
    match = re.search(r"preempted at step (\d+): saved it", errors[0])
    assert match, errors[0][-2000:]
    step = int(match.group(1))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert 0 < step < 5 and read_meta(checkpoints)[0] == step

    codes, _, errors = run_job(argv, tmp_path, DEVICES // PROCESSES)
    assert codes == [0, 0], [err[-2000:] for err in errors]
    assert f"resumed from {checkpoints}/{step}" in errors[0], errors[0][-2000:]
    assert read_meta(checkpoints)[0] == 5
