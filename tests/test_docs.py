"""The README stays true: its config reference is generated from the dataclasses, and CI runs
exactly the README's test command."""

import re
from pathlib import Path

from flatspec_jax.config import config_reference, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_readme_config_reference_matches_the_dataclasses():
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- config-reference:start -->\n(.*)\n<!-- config-reference:end -->", readme, re.S)
    assert table, "README lacks the config-reference markers"
    assert table.group(1) == config_reference(), (
        "README's config reference is stale: regenerate it from `python -m flatspec_jax.config`")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = "bash launch/local.sh test"
    assert command in readme
    assert command in (ROOT / ".ci" / "run").read_text()


def test_every_shipped_config_loads():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)
