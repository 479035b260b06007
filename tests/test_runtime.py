"""Process setup shared by every verb (``flatspec_jax.runtime``) and how a verb's process ends."""

import logging
import os
import sys
import types

import pytest
from transformers.utils import logging as hf_logging

from flatspec_jax import cli, runtime
from flatspec_jax.config import ConfigError, DistributedConfig, load_config

ADVICE = "TRANSFORMERS_NO_ADVISORY_WARNINGS"


def test_logging_setup_silences_transformers_advice_but_not_its_warnings(monkeypatch, caplog):
    # transformers advises at import that PyTorch is missing; no verb needs PyTorch.
    monkeypatch.setenv(ADVICE, "")  # recorded, so the variable setup_logging sets is undone after the test
    monkeypatch.delenv(ADVICE)
    runtime.setup_logging()
    logger = hf_logging.get_logger("transformers.flatspec_test")
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.WARNING, logger="transformers.flatspec_test"):
        logger.warning_advice("advice")
        logger.warning("warning")
    assert [r.getMessage() for r in caplog.records] == ["warning"]


def test_a_users_own_advisory_setting_is_kept(monkeypatch):
    monkeypatch.setenv(ADVICE, "")
    runtime.setup_logging()
    assert os.environ[ADVICE] == ""


class Left(Exception):
    """Stands in for leaving the process (os._exit after flushing)."""


@pytest.mark.parametrize("status, multi_process, leaves", [(1, True, True), (130, True, True), (0, True, False),
                                                           (1, False, False)])
def test_a_failing_process_of_a_multi_process_job_leaves_at_once(monkeypatch, status, multi_process, leaves):
    """It must not wait in jax.distributed's shutdown for peers that may wait for it in a collective."""
    def leave(code):
        raise Left(code)

    monkeypatch.setattr(cli, "_main", lambda argv: status)
    monkeypatch.setattr(cli, "_multi_process", lambda: multi_process)
    monkeypatch.setattr(cli, "_leave_now", leave)
    if leaves:
        with pytest.raises(Left) as left:
            cli.main([])
        assert left.value.args == (status,)
    else:
        assert cli.main([]) == status


def test_only_callbacks_onto_a_closed_event_loop_are_kept_out_of_stderr(monkeypatch):
    """TensorStore threads finishing a failed restore's other reads after orbax's loop closed raise
    'Event loop is closed' with no owning object; those are dropped, anything else is passed on."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    runtime.ignore_closed_loop_callbacks()

    def unraisable(exc, obj=None):
        return types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=None, err_msg=None, object=obj)

    late = unraisable(RuntimeError("Event loop is closed"))
    others = [unraisable(RuntimeError("Event loop is closed"), obj=object()), unraisable(RuntimeError("other")),
              unraisable(ValueError("Event loop is closed"))]
    for item in [late, *others]:
        sys.unraisablehook(item)
    assert seen == others


def test_a_verb_without_config_warns_that_it_runs_the_built_in_defaults(tmp_path, caplog):
    """The defaults read all of ShareGPT: hours of scoring for a user who forgot --config."""
    with caplog.at_level(logging.WARNING, logger="flatspec"):
        assert cli.main(["select", "--run-dir", str(tmp_path)]) == 1  # no scores yet: refused after the warning
    assert "no --config: the built-in defaults (data.source=sharegpt, data.limit=None" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flatspec"):
        (tmp_path / "run.yaml").write_text("data:\n  limit: 8\n")
        assert cli.main(["select", "--config", str(tmp_path / "run.yaml"), "--run-dir", str(tmp_path)]) == 1
    assert "no --config" not in caplog.text


@pytest.mark.parametrize("overrides, message", [
    (["distributed.coordinator_address=notahost"], r"distributed\.coordinator_address: expected host:port"),
    (["distributed.num_processes=-3"], r"distributed\.num_processes: must be >= 1"),
    (["distributed.num_processes=2", "distributed.process_id=5"],
     r"distributed\.process_id: must be < distributed\.num_processes \(2\)"),
])
def test_distributed_settings_are_checked_when_loaded(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_job_jax_cannot_join_is_a_config_error_naming_the_settings(monkeypatch):
    def refuse(**kwargs):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(runtime.jax.distributed, "initialize", refuse)
    monkeypatch.setattr(runtime.jax.distributed, "is_initialized", lambda: False)
    # Else the CPU collectives would switch to gloo for the rest of this process (their tests then abort).
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ConfigError, match=r"distributed\.\*: cannot join .*num_processes=2.*should be defined"):
        runtime.initialize_distributed(DistributedConfig(enabled=True))
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ConfigError, match=r"environment variable JAX_NUM_PROCESSES='two': expected an integer"):
        runtime.initialize_distributed(DistributedConfig(enabled=True))


@pytest.mark.parametrize("variables, detected", [
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, False),  # salloc / sbatch outside srun: one process
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "1",
      "SLURM_LOCALID": "1"}, True),  # an srun step of 4 tasks
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0"}, False),  # a one-task step
])
def test_a_slurm_job_is_joined_only_from_a_multi_task_srun_step(monkeypatch, variables, detected):
    for name in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "SLURM_NTASKS",
                 "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert runtime._cluster_detected() is detected


def test_sigterm_under_stop_when_told_is_a_request_to_stop_that_stays(monkeypatch):
    import signal

    for name, value in (("_told_to_stop", False), ("_interrupted", False), ("_stop_signal", signal.SIGTERM)):
        monkeypatch.setattr(runtime, name, value)
    before = signal.getsignal(signal.SIGTERM)
    assert not runtime.reached_preemption()
    with runtime.stop_when_told():
        os.kill(os.getpid(), signal.SIGTERM)  # the process lives on: the handler records the request
        assert runtime.reached_preemption()
    assert signal.getsignal(signal.SIGTERM) is before
    assert runtime.reached_preemption(), "a later loop of the same command stops at its first check"
    assert (runtime.stop_signal(), runtime.stop_cause()) == (signal.SIGTERM, "preempted")


def test_a_first_ctrl_c_is_a_request_to_stop_and_a_second_stops_at_once(monkeypatch, capsys):
    import signal

    for name, value in (("_told_to_stop", False), ("_interrupted", False), ("_stop_signal", signal.SIGTERM)):
        monkeypatch.setattr(runtime, name, value)
    before = signal.getsignal(signal.SIGINT)
    with runtime.stop_when_told():
        os.kill(os.getpid(), signal.SIGINT)
        assert runtime.reached_preemption()
        assert "Ctrl-C again stops at once" in capsys.readouterr().err
        os.kill(os.getpid(), signal.SIGTERM)  # a later SIGTERM leaves the cause as it was
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    assert (runtime.stop_signal(), runtime.stop_cause()) == (signal.SIGINT, "interrupted (Ctrl-C)")


def test_the_compilation_cache_is_left_off_over_several_cpu_devices(monkeypatch, tmp_path):
    """XLA:CPU executables loaded back from the cache can deadlock in their collectives (runtime's docstring)."""
    import jax

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {name: getattr(jax.config, name) for name in names}
    monkeypatch.setenv("FLATSPEC_CACHE_DIR", str(tmp_path))
    assert jax.default_backend() == "cpu" and jax.device_count() == 8
    runtime.enable_compilation_cache()
    assert {name: getattr(jax.config, name) for name in names} == before
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    try:
        runtime.enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    finally:
        for name, value in before.items():
            jax.config.update(name, value)


def test_checks_report_increasing_step_ids_to_jax_and_its_sync_point_stops_every_later_loop(monkeypatch):
    """In a multi-process job JAX's sync point is one past the furthest step id any process reported; the
    ids are the checks made so far, so they keep increasing from one loop of a command to the next."""
    import itertools

    monkeypatch.setattr(runtime, "_told_to_stop", False)
    monkeypatch.setattr(runtime, "_checks", itertools.count())
    reported = []
    monkeypatch.setattr(runtime.multihost_utils, "reached_preemption_sync_point",
                        lambda step: reported.append(step) or step == 3)
    assert [runtime.reached_preemption() for _ in range(2)] == [False, False]  # a first loop
    assert [runtime.reached_preemption() for _ in range(3)] == [False, True, True]  # the next: stops at id 3
    assert reported == [0, 1, 2, 3]


def test_a_process_that_joined_a_jax_job_leaves_sigterm_to_jaxs_notifier(monkeypatch):
    """JAX's preemption notifier holds SIGTERM from jax.distributed.initialize on, with one process too;
    replacing it would hide the notice from the other processes' sync point. Ctrl-C, which would stop one
    process and not the others, stays Python's."""
    import signal

    import jax

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    with runtime.stop_when_told():
        assert {signum: signal.getsignal(signum) for signum in before} == before
