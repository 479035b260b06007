"""The target's verification cost by the number of tokens it checks, and the speedup that leaves room for.

    python benchmarks/bench_verify_cost.py [--config configs/smollm2_sharegpt_demo.yaml] [--tokens 1 2 3 ...]
        [--committed 200] [--cache 384] [--calls 30] [--repeat 1] [--set KEY=VALUE ...]

One forward of the decoding target (per-layer weights and KV caches, as `flatspec eval` runs it)
over T new tokens at ``--committed`` filled slots of a ``--cache``-slot cache, reading the cache
and writing the T new slots in place (donated), greedy argmax of the logits: what a speculative
round's verification costs. Baseline ``T = 1``: one autoregressive step, measured in the same run.
Each T is jitted, warmed up, then timed as the median of ``--calls`` calls, the widths in rotating
order so that drift spreads over all of them. ``--repeat K`` runs K forwards inside each call (a
``fori_loop``, as the decoders run their rounds inside one ``while_loop``) and reports the time of
one: on an accelerator a call's host dispatch of the ~300 weight and cache buffers is a large part
of a 1-token forward, which the decoding loops do not pay.

From the cost ratios c(T) = time(T) / time(1) it prints, for chain speculation with gamma drafts
(T = gamma + 1), the best speedup any draft could give, (gamma + 1) / c(gamma + 1) (every draft
accepted, drafting free), and the acceptance length tau a round must reach for a 2x speedup,
2 c(gamma + 1) (drafting free; a real draft's work raises it). Where that exceeds gamma + 1, no
draft reaches 2x with that gamma on this device. Writes ``benchmarks/results/verify_cost.json``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, benchmark_parser, print_table, wait_for_quiet, write_results  # noqa: E402


def main() -> int:
    parser = benchmark_parser(__doc__, "verify_cost.json")
    parser.add_argument("--config", default=str(REPO / "configs" / "smollm2_sharegpt_demo.yaml"))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8, 16, 32, 64],
                        help="new tokens per forward (1 is the baseline and always measured)")
    parser.add_argument("--committed", type=int, default=200, help="filled cache slots before the new tokens")
    parser.add_argument("--cache", type=int, default=384, help="KV-cache slots per row")
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=1, help="forwards per timed call (inside one jit)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides")
    args = parser.parse_args()
    widths = sorted(set(args.tokens) | {1})
    if widths[0] < 1 or args.committed + widths[-1] > args.cache:
        raise SystemExit(f"--tokens must be >= 1 and --committed + the largest T ({args.committed + widths[-1]}) "
                         f"at most --cache ({args.cache})")
    gate = wait_for_quiet(args.max_load, args.max_wait)

    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from flatspec_jax import runtime
    from flatspec_jax.config import load_config
    from flatspec_jax.models.masks import cached_mask, causal_mask
    from flatspec_jax.stages.common import RunContext

    runtime.setup_logging()
    cfg = load_config(args.config, ["mesh.data=1", *args.overrides])
    target = RunContext(cfg).decoding_target
    graphdef, params = nnx.split(target)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def verify(params, cache, tokens, cache_index):
        model = nnx.merge(graphdef, params)
        width = tokens.shape[1]
        positions = cache_index[:, None] + jnp.arange(width)[None]
        mask = cached_mask(cache_index, causal_mask(1, width), args.cache)

        def forward(_, carry):
            out = model(tokens, positions, mask, carry[1], cache_index)
            return jnp.argmax(out.logits, axis=-1).astype(jnp.int32), out.cache

        return jax.lax.fori_loop(0, args.repeat, forward, (jnp.zeros((1, width), jnp.int32), cache))

    rng = np.random.default_rng(0)
    cache_index = jnp.full((1,), args.committed, jnp.int32)
    caches = {width: target.empty_cache(1, args.cache) for width in widths}
    inputs = {width: jnp.asarray(rng.integers(0, target.arch.vocab_size, (1, width)), jnp.int32) for width in widths}
    times: dict[int, list[float]] = {width: [] for width in widths}
    for width in widths:  # warm-up: one compilation per width
        began = time.perf_counter()
        _, caches[width] = verify(params, caches[width], inputs[width], cache_index)
        jax.block_until_ready(caches[width])
        print(f"[bench] T = {width}: compiled and ran in {time.perf_counter() - began:.1f} s", file=sys.stderr,
              flush=True)
    for call in range(args.calls):
        for width in widths[call % len(widths):] + widths[:call % len(widths)]:
            start = time.perf_counter()
            argmax, caches[width] = verify(params, caches[width], inputs[width], cache_index)
            jax.block_until_ready((argmax, caches[width]))
            times[width].append((time.perf_counter() - start) / args.repeat)
    median = {width: 1e3 * statistics.median(times[width]) for width in widths}
    ratio = {width: median[width] / median[1] for width in widths}

    rows, results = [], {}
    for width in widths:
        gamma = width - 1
        best = width / ratio[width]
        needed = 2 * ratio[width]
        results[str(width)] = {"ms": median[width], "cost_vs_one_token": ratio[width],
                               "best_chain_speedup": best, "tau_for_2x": needed}
        rows.append([width, f"{median[width]:.1f}", f"{ratio[width]:.2f}x",
                     "-" if gamma == 0 else f"{best:.2f}x",
                     "-" if gamma == 0 else f"{needed:.2f} of {width}" + (" (unreachable)" if needed > width else "")])
    device = f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}"
    precision = jax.config.jax_default_matmul_precision or "default"
    print_table(f"{target.arch.architecture} target, {args.committed} of {args.cache} cache slots filled, median of "
                f"{args.calls} calls of {args.repeat} forward(s) ({device}, matmul precision {precision}); baseline "
                "T = 1 (one autoregressive step)",
                ["T new tokens", "ms", "cost vs T = 1", "best chain speedup (gamma = T - 1, all accepted)",
                 "tau for 2x (drafting free)"], rows)
    out = write_results({"benchmark": "verify_cost", "config": args.config, "overrides": args.overrides,
                         "committed": args.committed, "cache": args.cache, "calls": args.calls,
                         "repeat": args.repeat, "gate": gate, "device": device, "matmul_precision": precision,
                         "results": results}, args.out)
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
