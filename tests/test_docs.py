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


DOCS = ("README.md", "BENCHMARKS.md", "benchmarks/README.md")


def quoted_benchmark_commands() -> list[tuple[str, str, str]]:
    """(doc, script, arguments) of every ``python benchmarks/<script>.py ...`` the docs quote, inline
    (a code span, which may wrap lines) or on a line of a fenced block."""
    commands = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        spans = [m.group(1) for m in re.finditer(r"`(python benchmarks/[^`]*)`", text)]
        spans += re.findall(r"^(python benchmarks/.*)$", text, re.M)
        for span in spans:
            script, *arguments = span.removeprefix("python ").split(maxsplit=1)
            arguments = arguments[0] if arguments else ""
            commands.append((doc, script, arguments))
    return commands


def test_every_quoted_benchmark_command_names_a_script_and_flags_it_takes():
    import subprocess
    import sys

    commands = quoted_benchmark_commands()
    assert len({script for _, script, _ in commands}) >= 10
    helps: dict[str, str] = {}
    for doc, script, arguments in commands:
        assert (ROOT / script).is_file(), f"{doc} quotes {script}, which does not exist"
        if script not in helps:
            helps[script] = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True,
                                           text=True, check=True, cwd=ROOT).stdout
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", arguments):
            assert re.search(rf"(?<![\w-]){flag}\b", helps[script]), f"{doc}: {script} takes no {flag}"
