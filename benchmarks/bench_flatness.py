"""Flatness scoring: flatspec_jax vs a plain transformers/PyTorch pipeline, on this machine's CPU.

    python benchmarks/bench_flatness.py [--out benchmarks/results/flatness.json] [--limit 32]

One invocation measures both sides, each in fresh child processes (so neither pays for the
other's imports, threads or memory):

1. Steady-state tokens/s. Both sides score the *same* tokenized samples (our ``tokens.npz``:
   the first ``--limit`` ShareGPT conversations through SmolLM2's chat template, <= 512 tokens).
   Model load and the first pass (compilation, allocator warm-up) are excluded: each side
   runs ``--passes`` more passes over the data and the fastest is reported (ours interleaves
   its scoring step and the bare forwards of 4 batch by batch, so the overhead compares them
   under the same machine speed).
   * ours: the jitted scoring step of ``flatspec_jax.scoring`` on its packed 4 x 512 batches
     (fused LM head + statistics; results copied to the host as ``score_dataset`` does);
   * theirs (``transformers-eager``): HF ``AutoModelForCausalLM`` from the same GGUF, batches of 4
     in file order padded to the longest, ``model(input_ids, attention_mask).logits``,
     ``softmax``, ``cosine_similarity`` with the uniform vector, masked mean per sample.
2. Whole-process wall time as a user runs it: ``flatspec score --run-dir TMP --set data.limit=N``
   twice (cold: empty ``$FLATSPEC_CACHE_DIR``, so tokenizer conversion, GGUF dequantization and
   XLA compilation all happen; warm: those caches populated, new run dir) vs a fresh Python
   process that runs the transformers pipeline from import to results (it tokenizes with the
   chat template itself; it reads the conversations with flatspec's jax-free ShareGPT reader,
   since the embedded file is truncated mid-record and ``json.load`` cannot read it).
3. Peak RSS of every measured process (``os.wait4`` rusage of that child alone).
4. Flatness overhead: our scoring step vs a bare forward pass of the same model on the same
   packed batches, without flatness: the model's usual output, ``[rows, 512, V]`` logits (the
   goal's baseline), and for reference the hidden states alone (``return_logits=False``, which
   skips the LM head, ~20% of SmolLM2's FLOPs, that flatness cannot do without). Each side's
   time is the sum over batches of the batch's fastest timed pass (a busy moment of the machine
   only adds time; pass totals moved the figure by several points between passes).

``--dtype`` is our ``model.dtype`` and ``model.param_dtype`` in every measured flatspec process and
``--theirs-dtype`` the transformers model's dtype (both float32 by default; the plain pipeline's
softmax and cosine run on float32 logits either way), so a bfloat16 run can be compared with the
plain float32 pipeline and with transformers in bfloat16.

With ``--device-throughput`` only our side runs, on JAX's default backend (the GPU or TPU when there
is one), at ``--rows`` packed rows per batch and ``--dtype``: tokens/s and achieved model FLOP/s of the
scoring step and of the bare forwards (4) over the same batches, and the device's peak memory, e.g.

    python benchmarks/bench_flatness.py --device-throughput --limit 1024 --rows 32 --dtype bfloat16

The machine's load average is checked first; above ``--max-load`` the benchmark waits (polling
every 30 s, at most ``--max-wait`` s) and records the load it ran under either way.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    benchmark_parser, child_env, layer_matmul_params, load1, print_table, rotating_turns, run_measured, self_rss_mib,
    wait_for_quiet, write_results)

GOALS = {"tokens_per_s_ratio": 1.5, "wall_time_ratio": 1.5, "flatness_overhead_pct": 5.0}


# ----------------------------------------------------------------------------------------------
# Workers (run in child processes)
# ----------------------------------------------------------------------------------------------


def forward_flops(arch, rows: int, row_length: int, logits: bool) -> float:
    """Model FLOPs of one forward over a packed ``[rows, row_length]`` batch: the layers' matmuls over
    every slot, causal attention (scores and values over the keys at or before each query: the half
    square the blocked attention computes, up to its block edges) and, with ``logits``, the LM head.
    Norms, RoPE, softmax and the flatness statistics are not counted."""
    tokens = rows * row_length
    attention = 2 * 2 * rows * (row_length * (row_length + 1) // 2) * arch.num_heads * arch.head_dim
    lm_head = 2 * arch.vocab_size * arch.hidden_size * tokens if logits else 0
    return arch.num_layers * (2 * layer_matmul_params(arch) * tokens + attention) + lm_head


def _timed_passes(run_pass, passes: int) -> list[float]:
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        run_pass()
        times.append(time.perf_counter() - start)
    return times


def worker_ours_steady(args) -> dict:
    """Our scoring step (and a bare forward) over the packed batches of an existing run dir."""
    t0 = time.perf_counter()
    import jax
    import numpy as np
    from flax import nnx

    from flatspec_jax import runtime, scoring
    from flatspec_jax.config import load_config
    from flatspec_jax.data.packing import pack_rows
    from flatspec_jax.data.prepare import prepare_samples
    from flatspec_jax.data.tokenizer import load_tokenizer
    from flatspec_jax import assets
    from flatspec_jax.models.masks import segment_causal_mask
    from flatspec_jax.sharding import ShardingRules, batch_sharding, make_mesh, process_rows
    from flatspec_jax.weights.to_nnx import load_target_model

    runtime.enable_compilation_cache()
    timings = {"import_s": time.perf_counter() - t0}
    cfg = load_config(None, [f"data.limit={args.limit}", f"data.max_length={args.max_length}",
                             f"run_dir={args.run_dir}", f"score.rows_per_batch={args.rows}",
                             f"model.dtype={args.dtype}", f"model.param_dtype={args.dtype}", *args.overrides])
    start = time.perf_counter()
    path = cfg.model.path or str(assets.smollm2_gguf())
    dataset = prepare_samples(cfg.data, path, load_tokenizer(path), Path(args.run_dir))
    timings["tokens_s"] = time.perf_counter() - start
    start = time.perf_counter()
    mesh, rules = make_mesh(cfg.mesh), ShardingRules()
    model = load_target_model(path, mesh, rules, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
    timings["model_load_s"] = time.perf_counter() - start

    plan = scoring.make_plan(dataset.lengths, cfg.score)
    graphdef, params = nnx.split(model)
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    extra = {"return_features": False} if "return_features" in inspect.signature(
        scoring.compile_score_step).parameters else {}  # as `flatspec score` with train.features=online
    step = scoring.compile_score_step(graphdef, cfg.score, plan.max_segments, mesh, rules, param_shardings, **extra)
    rows = batch_sharding(mesh, rules, 2)
    packed = [pack_rows(b, dataset.__getitem__, cfg.score.row_length, plan.max_segments) for b in plan.batches]
    batches = [scoring._global_rows(p, rows, process_rows(rows, p.tokens.shape)) for p in packed]

    def bare_forward(graphdef, return_logits, params, tokens, positions, segment_ids, loss_mask):
        del loss_mask
        out = nnx.merge(graphdef, params)(tokens, positions, segment_causal_mask(segment_ids),
                                          return_logits=return_logits)
        return out.logits if return_logits else out.hidden

    forwards = {name: jax.jit(functools.partial(bare_forward, graphdef, name == "logits"),
                              in_shardings=(param_shardings, rows, rows, rows, rows))
                for name in ("logits", "hidden")}

    kinds = ("score", *forwards)
    stats: list[dict | None] = [None] * len(batches)

    def run(kind: str, index: int) -> None:
        if kind == "score":  # results copied to the host, as score_dataset does
            stats[index] = jax.tree.map(np.asarray, step(params, *batches[index]))
        else:
            jax.block_until_ready(forwards[kind](params, *batches[index]))

    for kind in kinds:  # compilation and allocator warm-up, timed apart
        start = time.perf_counter()
        for index in range(len(batches)):
            run(kind, index)
        timings["score_first_pass_s" if kind == "score" else f"forward_{kind}_first_pass_s"] = (
            time.perf_counter() - start)
    batch_times = {kind: [[] for _ in batches] for kind in kinds}  # [kind][batch][pass] seconds
    for repeat in range(args.passes):  # the kinds interleaved batch by batch
        for index, kind in rotating_turns(len(batches), kinds, shift=repeat):
            start = time.perf_counter()
            run(kind, index)
            batch_times[kind][index].append(time.perf_counter() - start)
    pass_times = {kind: [sum(times[p] for times in batch_times[kind]) for p in range(args.passes)] for kind in kinds}
    # Each batch's fastest pass: a slow moment of the machine only ever adds time, so the sum of
    # per-batch minima is the least noisy estimate of each kind's own cost.
    best = {kind: sum(min(times) for times in batch_times[kind]) for kind in kinds}
    score_times, forward_times = pass_times["score"], {name: pass_times[name] for name in forwards}

    flat = {}
    for p, s in zip(packed, stats):
        slots = p.sample_index >= 0
        flat.update(zip(dataset.ids[p.sample_index[slots]].tolist(), s["flatness"][slots].tolist()))
    n_tokens = int(dataset.lengths.sum())
    pass_flops = {name: sum(forward_flops(model.arch, len(rows), cfg.score.row_length, logits=name != "forward_hidden")
                            for rows in plan.batches)
                  for name in ("score", "forward_logits", "forward_hidden")}
    memory = jax.devices()[0].memory_stats() or {}
    return {
        "side": "ours", "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "samples": len(dataset), "tokens": n_tokens,
        "dtype": args.dtype, "pass_flops": pass_flops, "device_peak_bytes": memory.get("peak_bytes_in_use"),
        "batches": len(plan.batches), "batch_shape": [cfg.score.rows_per_batch, cfg.score.row_length],
        "padding_fraction": plan.padding, "score_pass_s": score_times, "forward_pass_s": forward_times,
        "score_best_batches_s": best["score"], "forward_best_batches_s": {name: best[name] for name in forwards},
        "batch_times_s": batch_times,
        "tokens_per_s": n_tokens / min(score_times),
        "forward_tokens_per_s": {name: n_tokens / min(times) for name, times in forward_times.items()},
        "timings": timings, "flatness": flat, "peak_rss_self_mib": self_rss_mib(),
    }


def _hf_model(gguf: Path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype),
                                                local_files_only=True).eval()


def _hf_score_batches(model, samples: list[tuple[str, list[int], list[int]]], batch: int, pad_id: int) -> dict:
    """The plain pipeline: pad each batch to its longest sample, logits -> softmax -> cosine with
    uniform -> masked mean over positions whose next token is an assistant token."""
    import torch
    import torch.nn.functional as F

    out = {}
    with torch.inference_mode():
        for start in range(0, len(samples), batch):
            chunk = samples[start:start + batch]
            length = max(len(ids) for _, ids, _ in chunk)
            input_ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), length), dtype=torch.long)
            loss = torch.zeros((len(chunk), length), dtype=torch.bool)
            for row, (_, ids, mask) in enumerate(chunk):
                input_ids[row, :len(ids)] = torch.as_tensor(ids)
                attention[row, :len(ids)] = 1
                loss[row, :len(ids)] = torch.as_tensor(mask, dtype=torch.bool)
            logits = model(input_ids=input_ids, attention_mask=attention).logits
            probs = torch.softmax(logits.float(), dim=-1)
            uniform = torch.full((probs.shape[-1],), 1.0 / probs.shape[-1])
            flat = F.cosine_similarity(probs, uniform.view(1, 1, -1), dim=-1)  # [B, L]
            counted = loss[:, 1:] & attention[:, 1:].bool()  # position t predicts token t + 1
            means = (flat[:, :-1] * counted).sum(-1) / counted.sum(-1).clamp(min=1)
            for row, (sample_id, _, _) in enumerate(chunk):
                out[sample_id] = means[row].item() if counted[row].any() else float("nan")
    return out


def worker_theirs_steady(args) -> dict:
    """The transformers pipeline on our tokenized samples (same tokens and masks as ours)."""
    t0 = time.perf_counter()
    import numpy as np
    import torch

    from flatspec_jax import assets

    timings = {"import_s": time.perf_counter() - t0}
    data = np.load(Path(args.run_dir) / "tokens.npz", allow_pickle=False)
    ids, offsets, tokens, masks = data["ids"], data["offsets"], data["tokens"], data["loss_mask"]
    samples = [(str(ids[i]), tokens[offsets[i]:offsets[i + 1]].tolist(), masks[offsets[i]:offsets[i + 1]].tolist())
               for i in range(len(ids))]
    start = time.perf_counter()
    model = _hf_model(assets.smollm2_gguf(), args.theirs_dtype)
    timings["model_load_s"] = time.perf_counter() - start
    result = {}

    def score_pass():
        result.update(_hf_score_batches(model, samples, args.batch, 0))

    start = time.perf_counter()
    score_pass()
    timings["first_pass_s"] = time.perf_counter() - start
    times = _timed_passes(score_pass, args.passes)
    n_tokens = int(offsets[-1])
    return {"side": "transformers-eager", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "samples": len(samples), "tokens": n_tokens, "batch": args.batch,
            "padded_tokens": sum(max(len(s[1]) for s in samples[i:i + args.batch]) * len(samples[i:i + args.batch])
                                 for i in range(0, len(samples), args.batch)),
            "score_pass_s": times, "tokens_per_s": n_tokens / min(times), "timings": timings,
            "flatness": result, "peak_rss_self_mib": self_rss_mib()}


def _assistant_mask(tokenizer, messages: list[dict], n_tokens: int) -> list[int]:
    """1 on each assistant turn's tokens, from the token counts of rendered prefixes: the turn
    starts after ``messages[:i]`` + generation prompt and ends before the template's trailing
    newline after the end-of-turn token."""
    def count(msgs, gen):
        return len(tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)["input_ids"])

    mask = [0] * n_tokens
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or not message["content"] or i == 0:
            continue
        begin, end = count(messages[:i], True), count(messages[:i + 1], False) - 1
        for t in range(begin, min(end, n_tokens)):
            mask[t] = 1
    return mask


def worker_theirs_pipeline(args) -> dict:
    """What a user would write with transformers alone: load tokenizer and model from the GGUF,
    apply the chat template, score, write results."""
    from transformers import AutoTokenizer

    from flatspec_jax import assets
    from flatspec_jax.data.conversations import SkipReport
    from flatspec_jax.data.sources import iter_conversations

    gguf = assets.smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = _hf_model(gguf, args.theirs_dtype)
    samples = []
    for conv in iter_conversations("sharegpt", SkipReport(), args.limit):
        messages = conv.as_dicts()
        ids = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"][:args.max_length]
        mask = _assistant_mask(tokenizer, messages, len(ids))
        if any(mask[1:]):
            samples.append((conv.id, ids, mask))
    flat = _hf_score_batches(model, samples, args.batch, tokenizer.pad_token_id or 0)
    return {"side": "transformers-eager", "samples": len(samples), "tokens": sum(len(s[1]) for s in samples),
            "flatness": flat}


WORKERS = {"ours_steady": worker_ours_steady, "theirs_steady": worker_theirs_steady,
           "theirs_pipeline": worker_theirs_pipeline}


# ----------------------------------------------------------------------------------------------
# Orchestrator
# ----------------------------------------------------------------------------------------------


def _flatspec_argv() -> list[str]:
    script = Path(sys.executable).with_name("flatspec")
    return [str(script)] if script.exists() else [sys.executable, "-m", "flatspec_jax.cli"]


def _worker_argv(name: str, args, run_dir: Path, result: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--run-dir", str(run_dir),
            "--result", str(result), "--limit", str(args.limit), "--max-length", str(args.max_length),
            "--batch", str(args.batch), "--passes", str(args.passes), "--rows", str(args.rows), "--dtype", args.dtype,
            "--theirs-dtype", args.theirs_dtype, *(f"--set={o}" for o in args.overrides)]


def _flatness_diff(a: dict[str, float], b: dict[str, float]) -> dict:
    import math

    common = [k for k in a if k in b and not (math.isnan(a[k]) or math.isnan(b[k]))]
    diffs = [abs(a[k] - b[k]) for k in common]
    return {"compared": len(common), "only_one_side": len(set(a) ^ set(b)), "max_abs_diff": max(diffs, default=None)}


def _scores_flatness(run_dir: Path) -> dict[str, float]:
    import pyarrow.parquet as pq

    table = pq.read_table(run_dir / "scores.parquet")
    return dict(zip(table["id"].to_pylist(), table["flatness"].to_pylist()))


def _overheads(ours: dict) -> dict[str, float]:
    """Our scoring step's extra time over each bare forward, in %, from the per-batch best times."""
    score, forwards = ours["score_best_batches_s"], ours["forward_best_batches_s"]
    return {"flatness_overhead_pct": 100 * (score / forwards["logits"] - 1),
            "overhead_over_hidden_only_pct": 100 * (score / forwards["hidden"] - 1)}


def orchestrate(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_flatness_"))
    cache = work / "cache"  # starts empty: the first `flatspec score` is fully cold
    env = child_env(FLATSPEC_CACHE_DIR=str(cache))
    gate = wait_for_quiet(args.max_load, args.max_wait)
    print(f"[bench] load average {gate['load_at_start']:.2f} at start; work dir {work}", file=sys.stderr, flush=True)
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "python": platform.python_version()},
                     "settings": {"limit": args.limit, "max_length": args.max_length, "batch": args.batch,
                                  "passes": args.passes, "dtype": args.dtype, "theirs_dtype": args.theirs_dtype},
                     "load_gate": gate, "goals": GOALS}

    def log(step: str, m) -> None:
        print(f"[bench] {step}: {m.wall_s:.1f} s, peak RSS {m.peak_rss_mib:.0f} MiB, load {m.load_before:.2f}->"
              f"{m.load_after:.2f}", file=sys.stderr, flush=True)

    # 2 + 3: whole processes as a user runs them.
    wall = {}
    score_cmd = _flatspec_argv() + ["score", "--set", f"data.limit={args.limit}", "--set",
                                    f"data.max_length={args.max_length}", "--set", f"model.dtype={args.dtype}",
                                    "--set", f"model.param_dtype={args.dtype}"]
    for name in ("ours_cold", "ours_warm"):
        run_dir = work / name
        m = run_measured(score_cmd + ["--run-dir", str(run_dir)], env, work / name).check(name)
        log(name, m)
        wall[name] = m
    for name in ("theirs_1", "theirs_2"):
        m = run_measured(_worker_argv("theirs_pipeline", args, work / name, work / f"{name}.json"), env,
                         work / name).check(name)
        log(name, m)
        wall[name] = m
    theirs_pipeline = json.loads((work / "theirs_1.json").read_text())

    # 1 + 4: steady state, on the warm run's tokenized samples.
    steady = {}
    for name in ("ours_steady", "theirs_steady"):
        m = run_measured(_worker_argv(name, args, work / "ours_warm", work / f"{name}.json"), env,
                         work / name).check(name)
        log(name, m)
        steady[name] = json.loads((work / f"{name}.json").read_text())
        steady[name]["process_wall_s"], steady[name]["process_peak_rss_mib"] = m.wall_s, m.peak_rss_mib

    ours, theirs = steady["ours_steady"], steady["theirs_steady"]
    ours_flat = _scores_flatness(work / "ours_warm")
    results["steady_state"] = {
        "ours": {k: v for k, v in ours.items() if k != "flatness"},
        "transformers_eager": {k: v for k, v in theirs.items() if k != "flatness"},
        "tokens_per_s_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
        **_overheads(ours),
    }
    theirs_best = min(wall["theirs_1"].wall_s, wall["theirs_2"].wall_s)
    results["wall"] = {
        **{name: {"wall_s": m.wall_s, "peak_rss_mib": m.peak_rss_mib, "load_before": m.load_before,
                  "load_after": m.load_after} for name, m in wall.items()},
        "wall_time_ratio_cold": theirs_best / wall["ours_cold"].wall_s,
        "wall_time_ratio_warm": theirs_best / wall["ours_warm"].wall_s,
        # Our larger process (cold or warm) over their smaller one, as the wall times give theirs its best.
        "peak_rss_ratio": max(wall["ours_cold"].peak_rss_mib, wall["ours_warm"].peak_rss_mib) / min(
            wall["theirs_1"].peak_rss_mib, wall["theirs_2"].peak_rss_mib),
    }
    results["agreement"] = {
        "ours_cli_vs_theirs_steady_same_tokens": _flatness_diff(ours_flat, theirs["flatness"]),
        "ours_steady_vs_ours_cli": _flatness_diff(ours["flatness"], ours_flat),
        "ours_cli_vs_theirs_pipeline_own_tokenization": _flatness_diff(ours_flat, theirs_pipeline["flatness"]),
    }
    results["load_after"] = load1()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        results["work_dir"] = str(work)
    return results


def orchestrate_device(args) -> dict:
    """``--device-throughput``: our scoring step alone on JAX's default backend, at ``--rows`` rows per
    batch, against the bare forward of the same model over the same batches in the same process."""
    work = Path(tempfile.mkdtemp(prefix="bench_flatness_device_"))
    gate = wait_for_quiet(args.max_load, args.max_wait)
    env = child_env(JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", ""))  # "": the default backend, not CPU
    m = run_measured(_worker_argv("ours_steady", args, work / "run", work / "ours.json"), env,
                     work / "ours").check("ours_steady")
    ours = json.loads((work / "ours.json").read_text())
    shutil.rmtree(work, ignore_errors=True)
    ours.pop("flatness")
    passes = {"score": min(ours["score_pass_s"]),
              **{f"forward_{name}": min(times) for name, times in ours["forward_pass_s"].items()}}
    return {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "settings": {"limit": args.limit, "max_length": args.max_length, "rows": args.rows, "dtype": args.dtype,
                         "passes": args.passes, "overrides": args.overrides},
            "load_gate": gate, "load_after": load1(), "process_wall_s": m.wall_s,
            "process_peak_rss_mib": m.peak_rss_mib,
            "ours": ours,
            "tflop_s": {name: ours["pass_flops"][name] / seconds / 1e12 for name, seconds in passes.items()},
            "tokens_per_s": {name: ours["tokens"] / seconds for name, seconds in passes.items()},
            **_overheads(ours)}


def report_device(results: dict) -> None:
    o, settings = results["ours"], results["settings"]
    memory = o["device_peak_bytes"]
    print(f"\nflatness scoring throughput on {', '.join(o['devices'])} ({settings['dtype']}): first "
          f"{settings['limit']} ShareGPT samples ({o['samples']} samples, {o['tokens']} tokens) packed into "
          f"{o['batches']} batches of up to {settings['rows']} x {o['batch_shape'][1]}; "
          f"padding {o['padding_fraction']:.1%}; "
          f"device peak memory {'n/a' if memory is None else f'{memory / 2**30:.2f} GiB'}")
    labels = {"score": "scoring step (fused LM head + statistics)", "forward_logits": "bare forward to logits",
              "forward_hidden": "bare forward, hidden states only"}
    baseline = results["tokens_per_s"]["forward_logits"]
    print_table("fastest timed pass (model FLOPs: matmuls + causal attention)",
                ["step", "tokens/s", "TFLOP/s", "vs bare forward to logits"],
                [[labels[name], f"{rate:.0f}", f"{results['tflop_s'][name]:.3f}", f"{rate / baseline:.2f}x"]
                 for name, rate in results["tokens_per_s"].items()])
    print(f"flatness overhead over the bare forward to logits (each batch's fastest pass): "
          f"{results['flatness_overhead_pct']:.1f}% "
          f"(goal <= {GOALS['flatness_overhead_pct']}%)")


def report(results: dict) -> None:
    s, w = results["steady_state"], results["wall"]
    o, t = s["ours"], s["transformers_eager"]
    ours_dtype = results["settings"].get("dtype", "float32")
    theirs_dtype = results["settings"].get("theirs_dtype", "float32")
    print(f"\nflatness scoring, first {results['settings']['limit']} ShareGPT samples (chat template, "
          f"<= {results['settings']['max_length']} tokens; {o['samples']} samples, {o['tokens']} tokens), "
          f"{results['machine']['cpus']} CPUs, load {results['load_gate']['load_at_start']:.2f} at start, "
          f"{results['load_after']:.2f} at end; flatspec_jax in {ours_dtype}, transformers in {theirs_dtype}")
    print_table("1. steady state (model loaded, compiled; fastest of the timed passes)",
                ["pipeline", "pass s", "tokens/s", "vs transformers-eager"],
                [["transformers-eager (batch 4, padded, logits+softmax+cosine)", f"{min(t['score_pass_s']):.2f}",
                  f"{t['tokens_per_s']:.0f}", "1.00x"],
                 ["flatspec_jax scoring step (packed 4x512, fused)", f"{min(o['score_pass_s']):.2f}",
                  f"{o['tokens_per_s']:.0f}", f"{s['tokens_per_s_ratio']:.2f}x"],
                 *[[f"flatspec_jax bare forward ({label}, no flatness)", f"{min(o['forward_pass_s'][name]):.2f}",
                    f"{o['forward_tokens_per_s'][name]:.0f}",
                    f"{o['forward_tokens_per_s'][name] / t['tokens_per_s']:.2f}x"]
                   for name, label in (("logits", "to logits"), ("hidden", "hidden states only"))]])
    print(f"flatness overhead over the bare forward to logits (each batch's fastest pass): "
          f"{s['flatness_overhead_pct']:.1f}% "
          f"(goal <= {GOALS['flatness_overhead_pct']}%); over the hidden-only forward: "
          f"{s['overhead_over_hidden_only_pct']:.1f}%")
    rows = [[f"transformers-eager script (run {run})", f"{w[f'theirs_{run}']['wall_s']:.1f}",
             f"{w[f'theirs_{run}']['peak_rss_mib']:.0f}", ""] for run in (1, 2)]
    rows += [[f"flatspec score, {caches} caches", f"{w[f'ours_{caches}']['wall_s']:.1f}",
              f"{w[f'ours_{caches}']['peak_rss_mib']:.0f}", f"{w[f'wall_time_ratio_{caches}']:.2f}x"]
             for caches in ("cold", "warm")]
    print_table("2+3. whole process as a user runs it (wall time, peak RSS of that process)",
                ["process", "wall s", "peak RSS MiB", "speed-up vs transformers"], rows)
    print(f"peak RSS, our larger process over their smaller: {w['peak_rss_ratio']:.2f}")
    print("steady-state worker processes: ours peak RSS "
          f"{o['process_peak_rss_mib']:.0f} MiB, transformers {t['process_peak_rss_mib']:.0f} MiB")
    print(f"where our steady worker's time went: {json.dumps({k: round(v, 2) for k, v in o['timings'].items()})}")
    print(f"agreement of per-sample flatness: {json.dumps(results['agreement'])}")
    goals = [("tokens/s ratio", s["tokens_per_s_ratio"], GOALS["tokens_per_s_ratio"], True),
             ("wall-time ratio (warm)", w["wall_time_ratio_warm"], GOALS["wall_time_ratio"], True),
             ("wall-time ratio (cold)", w["wall_time_ratio_cold"], GOALS["wall_time_ratio"], True),
             ("peak RSS ratio ours/theirs", w["peak_rss_ratio"], 1.0, False),
             ("flatness overhead %", s["flatness_overhead_pct"], GOALS["flatness_overhead_pct"], False)]
    print_table("goals", ["metric", "measured", "goal", "met"],
                [[n, f"{v:.2f}", (">= " if hi else "< " if n.startswith("peak") else "<= ") + f"{g}",
                  "yes" if (v >= g if hi else v < g if n.startswith("peak") else v <= g) else "NO"]
                 for n, v, g, hi in goals])


def main() -> int:
    parser = benchmark_parser(__doc__, "flatness.json")
    parser.add_argument("--limit", type=int, default=32, help="ShareGPT conversations (data.limit)")
    parser.add_argument("--max-length", type=int, default=512, help="data.max_length")
    parser.add_argument("--batch", type=int, default=4, help="transformers batch size")
    parser.add_argument("--passes", type=int, default=3, help="timed steady-state passes after the first")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work dir (logs, run dirs)")
    parser.add_argument("--device-throughput", action="store_true",
                        help="only our scoring step, on JAX's default backend (GPU/TPU when present), at --rows rows "
                             "per batch: tokens/s and achieved FLOP/s (default --out: flatness_device.json)")
    parser.add_argument("--rows", type=int, default=4, help="our packed rows per scoring batch (score.rows_per_batch)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="our model.dtype and model.param_dtype")
    parser.add_argument("--theirs-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the transformers model's dtype (its softmax and cosine run in float32 either way)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="with --device-throughput: config overrides for our side, e.g. data.source=FILE.jsonl, "
                             "model.path=FILE.gguf, score.row_length=2048")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(WORKERS[args.worker](args)))
        return 0
    if args.overrides and not args.device_throughput:
        parser.error("--set applies to --device-throughput only (the comparison's two sides read the same data)")
    if args.device_throughput and args.out == parser.get_default("out"):
        args.out = str(Path(args.out).with_name("flatness_device.json"))
    measure, show = (orchestrate_device, report_device) if args.device_throughput else (orchestrate, report)
    results = measure(args)
    out = write_results(results, args.out)
    show(results)
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
