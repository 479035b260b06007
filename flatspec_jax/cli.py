"""The ``flatspec`` command: one verb per pipeline stage, each reading a typed YAML config.

    flatspec <verb> --config configs/<name>.yaml [--run-dir DIR] [--set key.path=value ...]

Stage code lives in its own modules; this file only parses arguments, applies the
overrides and dispatches, importing the heavy modules lazily so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from typing import Callable, Sequence

from flatspec_jax.config import Config, ConfigError, load_config

log = logging.getLogger("flatspec")

# verb -> (module:function, help). Each function takes (Config, argparse.Namespace) -> int.
VERBS: dict[str, tuple[str, str]] = {
    "regenerate": ("flatspec_jax.stages.regenerate:run",
                   "answer the source's user turns with the target (data.responses: target) -> responses.jsonl"),
    "score": ("flatspec_jax.stages.score:run", "score every sample's flatness -> scores.parquet"),
    "cache": ("flatspec_jax.stages.score:run_cache", "score and cache the target's features for offline training"),
    "select": ("flatspec_jax.stages.select:run", "apply select.rule to scores.parquet -> selection.json"),
    "train": ("flatspec_jax.stages.train:run", "train the EAGLE draft head (resumes from the latest checkpoint)"),
    "eval": ("flatspec_jax.stages.eval:run", "speculative vs autoregressive decoding on MT-bench -> eval.json"),
    "report": ("flatspec_jax.stages.report:run", "plot scores, selection, training curves and eval -> plots/*.png"),
    "pipeline": ("flatspec_jax.stages.pipeline:run",
                 "(regenerate ->) score -> (select ->) train -> eval -> report in one run directory"),
    "export": ("flatspec_jax.stages.export:run", "write the draft head in the public EAGLE layout -> export/eagle/"),
    "import": ("flatspec_jax.stages.import_eagle:run", "read an EAGLE-1/2 head into a params-only orbax checkpoint"),
    "generate": ("flatspec_jax.stages.generate:run", "chat with the target (speculative with --draft)"),
}
WRITES_RUN_DIR = frozenset(VERBS) - {"generate"}
"""Verbs that hold the run directory's lock while they run (`runtime.run_dir_lock`)."""
READS_AN_EXISTING_RUN_DIR = frozenset({"select", "report"})
"""Verbs with nothing to do in a run directory that does not exist yet: refused before the lock would make it."""
STOPS_WHEN_TOLD = frozenset({"regenerate", "score", "cache", "train", "eval", "pipeline"})
"""Verbs whose loops save their work and exit 143 on SIGTERM, 130 on a first Ctrl-C (`runtime.stop_when_told`)."""


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (default: built-in defaults)")
    parser.add_argument("--run-dir", help="run directory (overrides run_dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flatspec", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (_, help_text) in VERBS.items():
        sub = verbs.add_parser(verb, help=help_text, description=help_text)
        _add_common(sub)
        _VERB_ARGUMENTS.get(verb, lambda p: None)(sub)
    return parser


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="the user message")
    parser.add_argument("--draft", help="draft checkpoint directory: decode speculatively")
    parser.add_argument("--max-new-tokens", type=int, help="decode.max_new_tokens")
    parser.add_argument("--temperature", type=float, help="decode.temperature (0 = greedy)")
    parser.add_argument("--top-p", type=float, help="decode.top_p")


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft", help="draft checkpoint directory (default: the run's checkpoints/)")
    parser.add_argument("--turns", type=int, choices=(1, 2), help="eval.turns: MT-bench turns per question")


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("eagle",), default="eagle", help="output format (default: eagle)")
    parser.add_argument("--checkpoint", help="orbax checkpoint directory (default: <run_dir>/checkpoints)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", help="output directory (default: <run_dir>/export/<format>)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the written tensors (default: float32)")


def _import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("eagle",), default="eagle", help="input format (default: eagle)")
    parser.add_argument("--input", required=True, help="EAGLE head directory (config.json + weights)")
    parser.add_argument("--out", help="orbax checkpoint directory to create (default: <run_dir>/checkpoints)")


_VERB_ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "generate": _generate_arguments,
    "eval": _eval_arguments,
    "export": _export_arguments,
    "import": _import_arguments,
}

# Verb flags that are shorthands for config fields.
_FLAG_TO_KEY = {
    "max_new_tokens": "decode.max_new_tokens",
    "temperature": "decode.temperature",
    "top_p": "decode.top_p",
    "turns": "eval.turns",
}


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    spelled = {}
    for flag, key in _FLAG_TO_KEY.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
            spelled[overrides[-1]] = f"--{flag.replace('_', '-')} {value}"
    run_dir = getattr(args, "run_dir", None)
    if run_dir is not None:
        overrides.append(f"run_dir={run_dir}")
        spelled[overrides[-1]] = f"--run-dir {run_dir}"
    return load_config(args.config, overrides, spelled)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as err:
        print(f"flatspec {args.verb}: config error: {err}", file=sys.stderr)
        return 2
    from flatspec_jax import runtime

    try:
        runtime.initialize_distributed(cfg.distributed)
    except ConfigError as err:
        print(f"flatspec {args.verb}: config error: {err}", file=sys.stderr)
        return 2
    runtime.setup_logging(args.verbose)
    runtime.ignore_closed_loop_callbacks()
    if args.config is None and args.verb in WRITES_RUN_DIR:
        log.warning("no --config: the built-in defaults (data.source=%s, data.limit=%s, run_dir=%s); the demo is "
                    "--config configs/smollm2_sharegpt_demo.yaml", cfg.data.source, cfg.data.limit, cfg.run_dir)
    runtime.enable_compilation_cache()
    module_name, function_name = VERBS[args.verb][0].split(":")
    handler = getattr(importlib.import_module(module_name), function_name)
    try:
        if args.verb in READS_AN_EXISTING_RUN_DIR and not os.path.exists(cfg.run_dir):  # a file: the lock says so
            raise FileNotFoundError(f"run directory {cfg.run_dir} does not exist: run `flatspec score` (or "
                                    "`flatspec pipeline`) with this config first, or name the run with --run-dir")
        with (runtime.run_dir_lock(cfg.run_dir) if args.verb in WRITES_RUN_DIR else contextlib.nullcontext(),
              runtime.stop_when_told() if args.verb in STOPS_WHEN_TOLD else contextlib.nullcontext()):
            handler(cfg, args)
        return 0
    except runtime.RunDirBusyError as err:
        print(f"flatspec {args.verb}: {err}", file=sys.stderr)
        return 1
    except runtime.Preempted as err:
        log.warning("%s", err)
        return 128 + runtime.stop_signal()  # the status the signal would have given: 143 SIGTERM, 130 Ctrl-C
    except KeyboardInterrupt:
        log.warning("interrupted; a re-run resumes from the work saved so far (training from its last checkpoint: "
                    "a single Ctrl-C, unlike two, saves the step it is at)")
        return 130
    except (ValueError, OSError) as err:
        # Our own errors (bad config, data, weights, checkpoints) are ValueError/FileNotFoundError
        # subclasses whose message names the file, record or setting, and the system's OSErrors name
        # the path (a run directory that is a file, a folder without write permission); show them
        # without a traceback.
        if args.verbose or type(err) is ValueError:
            raise
        print(f"flatspec {args.verb}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one verb; returns the exit status.

    In a multi-process job a failing process (an exception, or an error it reported as a non-zero
    status) must not wait in jax.distributed's shutdown for peers that wait for it in a
    collective, so it reports and leaves at once; the coordination service then ends the peers.
    """
    try:
        status = _main(argv)
    except BaseException:
        if _multi_process():
            import traceback  # noqa: PLC0415

            traceback.print_exc()
            _leave_now(1)
        raise
    if status and _multi_process():
        _leave_now(status)
    return status


def _multi_process() -> bool:
    if "jax" not in sys.modules:  # failed before any verb imported (and joined) JAX
        return False
    import jax  # noqa: PLC0415

    return jax.distributed.is_initialized() and jax.process_count() > 1


def _leave_now(status: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
