"""Process setup shared by every verb (``flatspec_jax.runtime``)."""

import logging
import os

from transformers.utils import logging as hf_logging

from flatspec_jax import runtime


def test_logging_setup_silences_transformers_advice_but_not_its_warnings(monkeypatch, caplog):
    # transformers advises at import that PyTorch is missing; no verb needs PyTorch.
    monkeypatch.delenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", raising=False)
    runtime.setup_logging()
    logger = hf_logging.get_logger("transformers.flatspec_test")
    logger.propagate = True
    with caplog.at_level(logging.WARNING, logger="transformers.flatspec_test"):
        logger.warning_advice("advice")
        logger.warning("warning")
    assert [r.getMessage() for r in caplog.records] == ["warning"]


def test_a_users_own_advisory_setting_is_kept(monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", "")
    runtime.setup_logging()
    assert os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] == ""
