"""``flatspec regenerate``: the source's user turns answered by the target -> ``responses.jsonl``.

Needs ``data.responses: target`` (the setting that makes the later stages train on these
replies). Skips itself when the replies are current and resumes when interrupted
(:mod:`flatspec_jax.data.regenerate`).
"""

from __future__ import annotations

import argparse
from typing import Any

from flatspec_jax.config import Config, ConfigError
from flatspec_jax.stages.common import RunContext


def run(cfg: Config, args: argparse.Namespace | None = None, ctx: RunContext | None = None) -> dict[str, Any]:
    if cfg.data.responses != "target":
        raise ConfigError("data.responses is 'source', so no stage would read the target's "
                          "replies; set data.responses: target (e.g. --set data.responses=target)")
    return (ctx or RunContext(cfg)).responses
