"""Speculative decoding speed on MT-bench first turns: our AR, chain and tree vs HF transformers.

    python benchmarks/bench_decode.py --run-dir runs/smollm2_sharegpt_demo [--limit 20] [--max-new-tokens 128]
        [--variant NAME:key=value,...]...

In ONE process and on the same prompts (SmolLM2 chat template, greedy), after a warm-up so
no timing includes compilation, prompt by prompt with every decoder in turn (rotating order, so
drift in the machine's speed hits all alike):
  * baseline 1: our jitted autoregressive decoding (``decode.method=ar``);
  * baseline 2: transformers ``model.generate(do_sample=False)`` on the same GGUF weights (PyTorch on
    ``--hf-device``: the CPU, or CUDA where JAX runs on a GPU);
  * with ``--scan-baseline``, also our autoregressive decoding through the layer scan
    (``decode.scan_layers=true``, the layout before per-layer decoding weights), as ``ours_ar_scan``;
  * ours: speculative decoding with the run's trained draft head, one decoder per ``--variant``
    (``decode.*`` settings over the config's, e.g. ``chain4:method=chain,gamma=4``; with
    ``draft_vocab=N`` the draft proposes only the run's N most frequent tokens; a head trained
    with ``draft.vocab`` always drafts from its own tokens, and N must then be 0 or their count).
Prints tokens/s, tau (tokens emitted per target forward, the prefill's token excluded), drafts
verified per round (fewer than gamma with ``min_confidence``) and the speedups over both
baselines, checks that every greedy output equals our autoregressive one, and writes JSON and a
bar plot (PNG beside the JSON).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (REPO, benchmark_parser, decode_variant, load1, rotating_turns, wait_for_quiet,  # noqa: E402
                     write_results)


DEFAULT_VARIANTS = ("chain4:method=chain,gamma=4", "tree16:method=tree,depth=4,top_k=4,total_tokens=16",
                    "tree63:method=tree,depth=5,top_k=8,total_tokens=63")


VARIANT_KEYS = ("method", "gamma", "min_confidence", "depth", "top_k", "total_tokens", "draft_vocab")


def _plot(results: dict[str, dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(names)), 3.5))
    bars = ax.bar(names, [results[n]["tokens_per_s"] for n in names], color="tab:blue")
    for bar, name in zip(bars, names):
        ax.annotate(f"tau {results[name]['tau']:.2f}\n{results[name]['speedup_vs_ours_ar']:.2f}x",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.tick_params(axis="x", labelrotation=15)
    ax.set_ylabel("generated tokens/s")
    ax.set_title(title, fontsize=9)
    ax.margins(y=0.25)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _parse() -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "decode.json")
    parser.add_argument("--run-dir", required=True, help="run directory with a trained draft in checkpoints/")
    parser.add_argument("--config", default=str(REPO / "configs" / "smollm2_sharegpt_demo.yaml"))
    parser.add_argument("--limit", type=int, default=20, help="MT-bench questions (first turns)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:key=value,... speculative decoder over the config's decode settings "
                             f"(default: {' '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides")
    parser.add_argument("--scan-baseline", action="store_true",
                        help="also time our AR decoding through the layer scan (decode.scan_layers=true)")
    parser.add_argument("--hf-device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="PyTorch device of the transformers baseline (auto: cuda when JAX's devices are GPUs)")
    return parser.parse_args()


def main() -> None:
    args = _parse()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet = wait_for_quiet(args.max_load, args.max_wait)

    import jax
    import numpy as np
    import torch

    from flatspec_jax import runtime
    from flatspec_jax.config import load_config
    from flatspec_jax.data.chat import render_prompt
    from flatspec_jax.data.prompts import load_prompts
    from flatspec_jax.decoding.runner import Decoder
    from flatspec_jax.stages.common import RunContext

    runtime.setup_logging()
    runtime.enable_compilation_cache()
    base = [f"run_dir={args.run_dir}", f"decode.max_new_tokens={args.max_new_tokens}", "mesh.data=1", *args.overrides]
    cfg = load_config(args.config, base)
    variants = dict(decode_variant(spec) for spec in (args.variant or DEFAULT_VARIANTS))
    ctx = RunContext(cfg)
    prompts = [render_prompt(ctx.tokenizer, [{"role": "user", "content": p.turns[0]}])
               for p in load_prompts("mtbench", args.limit)]
    head = ctx.draft_head()
    eos, pad = ctx.eos_ids(), ctx.pad_id()
    decoders = {"ours_ar": Decoder(ctx.decoding_target, cfg.decode, eos, pad, method="ar")}
    if args.scan_baseline:
        decoders["ours_ar_scan"] = Decoder(ctx.target, cfg.decode, eos, pad, method="ar")
    settings = {}
    for name, overrides in variants.items():
        settings[name] = load_config(args.config, base + overrides).decode
        decoders[f"ours_{name}"] = Decoder(ctx.decoding_target, settings[name], eos, pad, head=head,
                                           draft_ids=ctx.decoding_draft_ids(size=settings[name].draft_vocab))
    width = max(-(-len(p) // 64) * 64 for p in prompts)
    key = jax.random.key(0)

    # Baseline 2: transformers generate on the same weights and prompts.
    from transformers import AutoModelForCausalLM

    gguf = Path(ctx.model_path)
    accelerator = jax.devices()[0]
    hf_device = args.hf_device if args.hf_device != "auto" else ("cuda" if accelerator.platform == "gpu" else "cpu")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = model.to(hf_device).eval()
    precision = jax.config.jax_default_matmul_precision or "default"
    if hf_device == "cuda" and precision != "highest":
        print(f"[bench] warning: JAX's float32 matmuls run at precision {precision} (TF32 on this GPU) against "
              "PyTorch's full float32; JAX_DEFAULT_MATMUL_PRECISION=highest makes them alike (gpu_check.sh sets it)",
              file=sys.stderr, flush=True)
    eos_list = list(eos)

    def hf_generate(prompt: np.ndarray) -> tuple[np.ndarray, float, int, int]:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(torch.tensor(prompt[None], dtype=torch.long, device=hf_device), do_sample=False,
                                 max_new_tokens=args.max_new_tokens, eos_token_id=eos_list, pad_token_id=pad)
        generated = out[0, len(prompt):].cpu().numpy()
        return generated, time.perf_counter() - start, max(len(generated) - 1, 0), 0

    def ours(decoder: Decoder, prompt: np.ndarray) -> tuple[np.ndarray, float, int, int]:
        out = decoder.run([prompt], key, width)
        return out.tokens[0], out.seconds, int(out.target_calls[0]), 0 if out.drafts is None else int(out.drafts[0])

    runners = {**{name: functools.partial(ours, decoder) for name, decoder in decoders.items()},
               "hf_generate": hf_generate}
    for name, run in runners.items():  # warm-up: compilation, allocator
        start = time.perf_counter()
        run(prompts[0])
        print(f"[bench] warm-up {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    outputs: dict[str, list[np.ndarray]] = {name: [None] * len(prompts) for name in runners}
    totals = {name: {"tokens": 0, "seconds": 0.0, "calls": 0, "drafts": 0} for name in runners}
    names = list(runners)
    for i, name in rotating_turns(len(prompts), names):  # every decoder in turn, prompt by prompt
        generated, seconds, calls, drafts = runners[name](prompts[i])
        outputs[name][i] = generated
        totals[name]["tokens"] += len(generated)
        totals[name]["seconds"] += seconds
        totals[name]["calls"] += calls
        totals[name]["drafts"] += drafts
        if all(outputs[n][i] is not None for n in names):
            print(f"[bench] prompt {i + 1}/{len(prompts)} done", file=sys.stderr, flush=True)
    results: dict[str, dict] = {}
    for name, t in totals.items():
        results[name] = {"tokens": t["tokens"], "seconds": t["seconds"], "tokens_per_s": t["tokens"] / t["seconds"],
                         "tau": (t["tokens"] - len(prompts)) / t["calls"] if t["calls"] else 0.0,
                         "drafts_per_round": t["drafts"] / t["calls"] if t["calls"] else 0.0}

    reference = outputs["ours_ar"]
    for name, result in results.items():
        result["speedup_vs_ours_ar"] = result["tokens_per_s"] / results["ours_ar"]["tokens_per_s"]
        result["speedup_vs_hf_generate"] = result["tokens_per_s"] / results["hf_generate"]["tokens_per_s"]
        result["same_output_as_ours_ar"] = float(np.mean([
            np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(outputs[name], reference)]))

    report = {
        "benchmark": "bench_decode", "jax_device": accelerator.device_kind, "hf_device": hf_device,
        "model_dtype": cfg.model.dtype, "jax_matmul_precision": precision, "hf_dtype": "float32",
        "torch_float32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch_threads": torch.get_num_threads(),
        "load": {**quiet, "load_at_end": load1()},
        "run_dir": str(args.run_dir), "questions": len(prompts), "max_new_tokens": args.max_new_tokens,
        "variants": {name: {k: getattr(d, k) for k in VARIANT_KEYS} for name, d in settings.items()},
        "results": results,
    }
    out = write_results(report, args.out)
    where = accelerator.device_kind if accelerator.platform == "gpu" else f"{os.cpu_count()} CPU cores"
    _plot(results, out.with_suffix(".png"), f"SmolLM2-135M, {len(prompts)} MT-bench first turns, greedy, "
          f"<= {args.max_new_tokens} new tokens, {where}")

    print(f"\nMT-bench first turns: {len(prompts)} questions, greedy, <= {args.max_new_tokens} new tokens, "
          f"load {quiet['load_at_start']:.2f}")
    print(f"{'decoder':<14} {'tokens/s':>9} {'tau':>6} {'drafts/round':>13} {'vs ours AR':>11} {'vs HF generate':>15} "
          f"{'same output':>12}")
    for name, r in results.items():
        print(f"{name:<14} {r['tokens_per_s']:>9.2f} {r['tau']:>6.2f} {r['drafts_per_round']:>13.2f} "
              f"{r['speedup_vs_ours_ar']:>10.2f}x "
              f"{r['speedup_vs_hf_generate']:>14.2f}x {r['same_output_as_ours_ar']:>12.0%}")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
