"""Process setup shared by every verb (``flatspec_jax.runtime``) and how a verb's process ends."""

import logging
import os

import pytest
from transformers.utils import logging as hf_logging

from flatspec_jax import cli, runtime

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
