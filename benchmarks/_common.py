"""Shared benchmark helpers: a quiet-machine gate, measured subprocesses, table printing.

Nothing here imports jax, torch or flatspec_jax, so a measured child process pays for its own
imports only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]


def benchmark_parser(doc: str, result_name: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--out`` (default ``benchmarks/results/<result_name>``) and
    the quiet-machine gate's ``--max-load`` / ``--max-wait``; described by ``doc``'s first line."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / result_name))
    parser.add_argument("--max-load", type=float, default=1.5, help="wait while the load average is above this")
    parser.add_argument("--max-wait", type=float, default=600, help="longest wait for the load, seconds")
    return parser


def decode_variant(spec: str) -> tuple[str, list[str]]:
    """A ``--variant NAME:k=v,k=v`` of the decoding settings -> (NAME, ["decode.k=v", ...])."""
    name, _, settings = spec.partition(":")
    if not name or not settings:
        raise SystemExit(f"--variant {spec!r}: expected NAME:key=value,...")
    return name, [f"decode.{item}" for item in settings.split(",")]


def load1() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, max_wait_s: float, poll_s: float = 30.0) -> dict:
    """Waits until the 1-minute load average is at most ``max_load`` (polling every ``poll_s``),
    at most ``max_wait_s``; returns what was seen, so results can say how loaded the machine was."""
    start = time.monotonic()
    seen = [load1()]
    while seen[-1] > max_load and time.monotonic() - start < max_wait_s:
        print(f"[bench] load average {seen[-1]:.2f} > {max_load}; waiting {poll_s:.0f} s "
              f"({time.monotonic() - start:.0f}/{max_wait_s:.0f} s)", file=sys.stderr, flush=True)
        time.sleep(poll_s)
        seen.append(load1())
    return {"load_at_start": seen[-1], "waited_s": round(time.monotonic() - start, 1),
            "quiet": seen[-1] <= max_load, "max_load": max_load}


@dataclasses.dataclass
class Measured:
    """A finished child process: wall seconds, its own peak RSS, exit code and log files."""

    wall_s: float
    peak_rss_mib: float
    returncode: int
    stdout: Path
    stderr: Path
    load_before: float
    load_after: float

    def check(self, what: str) -> "Measured":
        if self.returncode != 0:
            tail = self.stderr.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{what} failed with exit code {self.returncode}:\n{tail}")
        return self


def run_measured(argv: Sequence[str], env: dict[str, str], log_prefix: Path, cwd: Path = REPO) -> Measured:
    """Runs ``argv`` in a fresh process and measures it alone: wall time from spawn to exit and the
    peak RSS of that one child (``os.wait4``'s rusage, not RUSAGE_CHILDREN's max over all children)."""
    stdout, stderr = log_prefix.with_suffix(".out"), log_prefix.with_suffix(".err")
    before = load1()
    with open(stdout, "w") as out, open(stderr, "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), env=env, cwd=cwd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    # ru_maxrss is in KiB on Linux.
    return Measured(wall, usage.ru_maxrss / 1024, proc.returncode, stdout, stderr, before, load1())


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a measured child: offline HF, CPU JAX with its real device count (``extra``
    overrides, e.g. ``JAX_PLATFORMS=""`` for JAX's default backend)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FLATSPEC_CACHE_DIR")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "+".join("-" * (w + 2) for w in widths)
    print(f"\n{title}")
    print(line)
    for k, row in enumerate(cells):
        print(" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print(line)
    print(line)


def self_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def accelerators() -> str | None:
    """The machine's accelerators, e.g. "1 x NVIDIA H100 80GB HBM3" (None on a CPU-only host), asked of
    nvidia-smi or the TPU environment: never of JAX, which would claim the device's memory here."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30, check=True).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        names = []
    names = [name.strip() for name in names if name.strip()]
    if names:
        return f"{len(names)} x {names[0]}"
    return os.environ.get("TPU_ACCELERATOR_TYPE")


def write_results(results: dict, out: str | Path) -> Path:
    """Writes a benchmark's results as sorted, indented JSON (parents created), atomically, with when and
    where they were measured (``recorded``: local date and time zone, host platform, CPU count and
    accelerators) added."""
    results = {"recorded": {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "platform": platform.platform(),
                            "cpus": os.cpu_count(), "accelerators": accelerators()}, **results}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # a rewrite cut short leaves the old file whole
    partial.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    os.replace(partial, out)
    return out


def layer_matmul_params(arch) -> int:
    """Weights one decoder layer of ``arch`` (a :class:`flatspec_jax.weights.arch.ArchSpec`) multiplies
    every token by: q/k/v/o projections and the gated MLP (2 FLOPs each per token)."""
    d, n, k, h, f = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.intermediate_size
    return d * n * h + 2 * d * k * h + n * h * d + 3 * d * f


def rotating_turns(count: int, names: Sequence[str], shift: int = 0) -> Iterator[tuple[int, str]]:
    """``(i, name)`` for items ``i = 0..count-1``, every name once per item, the order rotating with
    ``i + shift``: timing kinds of work interleaved this way shares a drift in the machine's speed
    (common on a shared VM) among all of them instead of landing on whichever ran during it."""
    for i in range(count):
        for offset in range(len(names)):
            yield i, names[(i + shift + offset) % len(names)]
