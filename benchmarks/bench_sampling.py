"""Top-p (nucleus) warping: our sort-free bisection against the sorting formulation it replaced.

    python benchmarks/bench_sampling.py [--vocab 49152] [--shapes 1x1 1x3 8x3 200x3] [--top-p 0.95]

Baseline ``sorted``: sort every distribution's log-probabilities, keep the tokens whose preceding
mass is below top_p and every token at least as likely as the last one kept (how
`flatspec_jax.decoding.sampling` found the nucleus until 2026-12-04). Ours: `warped_log_probs`
(bisection over the bit patterns of -log p, one masked sum over V per step). Also ``no top-p``
(top_p = 1: the log-softmax alone) as the floor. Each is jitted, warmed up, then timed as the
median of ``--calls`` calls on [rows, positions, V] logits (rows x positions: 1 x 3 is one row's
chain-2 verification, 200 x 3 a batch of 200). Checks that ours keeps exactly the sorted
reference's tokens, and prints and writes (``benchmarks/results/sampling.json``) the times and
the baseline / ours ratio per shape.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import benchmark_parser, print_table, wait_for_quiet, write_results  # noqa: E402


def main() -> int:
    parser = benchmark_parser(__doc__, "sampling.json")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size (SmolLM2's by default)")
    parser.add_argument("--shapes", nargs="+", default=["1x1", "1x3", "8x3", "200x3"], help="ROWSxPOSITIONS")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--calls", type=int, default=9)
    args = parser.parse_args()
    gate = wait_for_quiet(args.max_load, args.max_wait)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from flatspec_jax.decoding.sampling import SamplingSettings, warped_log_probs

    def sorted_nucleus(logits: jax.Array) -> jax.Array:
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        ordered = jnp.sort(log_probs, axis=-1)[..., ::-1]
        before = jnp.cumsum(jnp.exp(ordered), axis=-1) - jnp.exp(ordered)
        floor = jnp.min(jnp.where(before < args.top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        return jax.nn.log_softmax(jnp.where(log_probs >= floor, log_probs, -jnp.inf), axis=-1)

    sides = {
        "sorted": jax.jit(sorted_nucleus),
        "ours": jax.jit(lambda logits: warped_log_probs(logits, SamplingSettings(1.0, args.top_p))),
        "no top-p": jax.jit(lambda logits: warped_log_probs(logits, SamplingSettings(1.0, 1.0))),
    }
    rng = np.random.default_rng(0)
    rows_out, results = [], {}
    for shape in args.shapes:
        rows, positions = (int(n) for n in shape.split("x"))
        logits = jnp.asarray(rng.standard_normal((rows, positions, args.vocab)).astype(np.float32) * 3)
        kept = {name: np.isfinite(np.asarray(fn(logits))) for name, fn in sides.items()}  # also the warm-up
        same = bool(np.array_equal(kept["sorted"], kept["ours"]))
        times = {}
        for name, fn in sides.items():
            calls = []
            for _ in range(args.calls):
                start = time.perf_counter()
                fn(logits).block_until_ready()
                calls.append(time.perf_counter() - start)
            times[name] = 1e3 * statistics.median(calls)
        results[shape] = {**{f"{name}_ms": t for name, t in times.items()}, "same_nucleus": same,
                          "sorted_over_ours": times["sorted"] / times["ours"]}
        rows_out.append([shape, f"{times['sorted']:.2f}", f"{times['ours']:.2f}", f"{times['no top-p']:.2f}",
                         f"{times['sorted'] / times['ours']:.1f}x", same])
    print_table(f"top-p {args.top_p} over {args.vocab:,} tokens, median ms of {args.calls} calls ({jax.devices()[0]})",
                ["rows x positions", "sorted (baseline)", "ours", "no top-p", "baseline / ours", "same tokens kept"],
                rows_out)
    out = write_results({"benchmark": "sampling", "vocab": args.vocab, "top_p": args.top_p, "gate": gate,
                         "device": str(jax.devices()[0]), "results": results}, args.out)
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
