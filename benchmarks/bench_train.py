"""EAGLE draft training throughput: flatspec_jax's jitted step vs the same step in plain PyTorch, on this CPU.

    python benchmarks/bench_train.py [--out benchmarks/results/train.json] [--rows 4] [--row-length 512]
                                     [--steps 5] [--warmup 1] [--max-load 1.5] [--max-wait 600]

Both sides train an EAGLE head (fc 2D -> D with bias + one Llama decoder layer without input
norm, the target's LM head, as SafeAILab/EAGLE's ``cnets.py``) for the frozen SmolLM2-135M
target on the *same* packed batch of real ShareGPT tokens (SmolLM2's chat template, packed into
``--rows`` rows of ``--row-length`` tokens by our planner), with the same loss (SmoothL1 + 0.1
soft CE, masked means over the same trained positions), input noise, norm clipping 0.5 (our default; the
reference clips values) and AdamW:

* ours: ``flatspec_jax.train.step.compile_steps`` (what ``flatspec train`` runs), target loaded by
  ``flatspec_jax.weights.to_nnx.load_target_model`` from the GGUF, float32;
* theirs: ``benchmarks/_torch_eagle.py``, eager PyTorch, target ``transformers.AutoModelForCausalLM``
  from the same GGUF (float32, frozen, SDPA attention with a packed 4-D mask).

Two variants: ``online`` (the target forward runs inside the step, the default of ``flatspec
train``) and ``offline`` (features precomputed, as with ``train.features=offline``; stored bf16 as
the feature cache does). Both sides run in this one process, interleaved step by step (ours,
theirs, ours, ...) after their warm-up (compilation, first steps), so a change of machine load
hits both alike; the median of ``--steps`` timed steps is reported as tokens/s (non-padding tokens
of the batch per second). Before timing, both sides compute the batch's loss without noise from
the same initial head parameters: the two numbers must agree (same step, not just same shapes).

Both steps are dominated by matmuls (the 30-layer target forward and three [tokens, 576] x [576, 49152]
LM-head products), so the report also gives each side's approximate GFLOP/s and a probe of the
LM-head-sized matmul alone in XLA and in PyTorch: the ceiling either side can reach here. The
FLOP count is the reference computation's (LM heads at every position, full attention squares);
our step skips LM-head chunks without trained positions and attention above the causal diagonal,
so its figure is an effective rate: the same work per second as PyTorch's, not the FLOPs it ran.

With ``--draft-vocab N`` (default 4096; 0 skips it) a third step is timed in the same interleaving:
ours with ``draft.vocab = N`` (the loss over the N most frequent tokens of the batch, as
``flatspec train`` does with that setting; not the same step as PyTorch's, so it is reported
against our full-vocabulary step, not as a PyTorch ratio).

The machine's 1-minute load average is checked before loading (later this script's own loading and
compiling would count in it); above ``--max-load`` the benchmark waits (polling every 30 s, at most
``--max-wait`` s) and records the load it ran under either way.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    benchmark_parser, layer_matmul_params, load1, print_table, self_rss_mib, wait_for_quiet, write_results)

GOAL_RATIO = 1.2
LOSS_AGREEMENT_RTOL = 1e-4


def real_batch(rows: int, row_length: int, limit: int, work: Path) -> tuple[dict, dict]:
    """The first ``rows`` packed rows of ShareGPT (our chat template and planner) as [R, L] int32 arrays."""
    import numpy as np

    from flatspec_jax import assets
    from flatspec_jax.config import DataConfig
    from flatspec_jax.data.packing import pack_rows, padding_fraction, segment_slots
    from flatspec_jax.data.pipeline import plan_training_rows
    from flatspec_jax.data.prepare import prepare_samples
    from flatspec_jax.data.tokenizer import load_tokenizer

    path = str(assets.smollm2_gguf())
    dataset = prepare_samples(DataConfig(limit=limit, max_length=row_length), path, load_tokenizer(path), work)
    plan = plan_training_rows(dataset, np.arange(len(dataset)), row_length)
    if len(plan) < rows:
        raise SystemExit(f"only {len(plan)} packed rows from {limit} conversations; raise --limit")
    chosen = plan[:rows]
    packed = pack_rows(chosen, dataset.__getitem__, row_length, segment_slots(row_length))
    batch = {"tokens": packed.tokens, "positions": packed.positions, "segment_ids": packed.segment_ids,
             "loss_mask": packed.loss_mask}
    lengths = [min(int(n), row_length) for n in dataset.lengths]
    info = {"samples": sum(len(r) for r in chosen), "tokens": packed.num_tokens,
            "assistant_tokens": int(packed.loss_mask.sum()),
            "padding_fraction": padding_fraction(chosen, lengths, row_length), "shape": [rows, row_length]}
    return batch, info


class Ours:
    """flatspec_jax's compiled train step (and eval step) on one CPU device, set up as ``train_draft`` does."""

    def __init__(self, batch: dict, rows: int, row_length: int, loss_chunk: int | None, draft_vocab: int):
        import jax
        import jax.numpy as jnp
        import ml_dtypes
        import numpy as np
        from flax import nnx
        from jax.sharding import NamedSharding, PartitionSpec

        from flatspec_jax import assets, runtime
        from flatspec_jax.checkpoint.manager import flatten_params, opt_state_shardings
        from flatspec_jax.config import MeshConfig, load_config
        from flatspec_jax.decoding.draft_vocab import frequent_token_ids
        from flatspec_jax.models.eagle import create_eagle_head
        from flatspec_jax.models.masks import segment_causal_mask
        from flatspec_jax.sharding import ShardingRules, make_mesh, place_state, state_shardings
        from flatspec_jax.train.optim import build_optimizer
        from flatspec_jax.train.step import StepSettings, TrainState, batch_spec, compile_steps
        from flatspec_jax.weights.to_nnx import load_target_model

        runtime.enable_compilation_cache()
        self.jax = jax
        chunk = [] if loss_chunk is None else [f"train.loss_chunk={loss_chunk}"]
        cfg = load_config(None, [f"train.row_length={row_length}", f"train.batch_tokens={rows * row_length}", *chunk])
        mesh, rules = make_mesh(MeshConfig(data=1), jax.devices()[:1]), ShardingRules()
        start = time.perf_counter()
        target = load_target_model(str(assets.smollm2_gguf()), mesh, rules)
        self.load_s = time.perf_counter() - start
        self.arch = target.arch
        head = create_eagle_head(target.arch, cfg.draft.num_layers, seed=cfg.seed)
        head_graphdef, params = nnx.split(head)
        self.initial_params = {k: np.asarray(v[...]) for k, v in flatten_params(params).items()}
        param_shardings = state_shardings(params, mesh, rules)
        params = place_state(params, mesh, rules)
        tx = build_optimizer(cfg.train)
        opt_shardings = opt_state_shardings(tx, params, param_shardings, mesh)
        replicated = NamedSharding(mesh, PartitionSpec())

        def initial_state() -> TrainState:
            placed = jax.tree.map(jnp.copy, params)  # each step function donates its own state
            return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=placed,
                              opt_state=jax.jit(tx.init, out_shardings=opt_shardings)(placed))

        target_graphdef, self.target_params = nnx.split(target)
        target_shardings = jax.tree.map(lambda a: a.sharding, self.target_params)

        def compiled(draft_ids):
            return compile_steps(head_graphdef, target_graphdef, tx, StepSettings.from_config(cfg.train, cfg.seed),
                                 TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings),
                                 target_shardings, mesh, rules, draft_ids)

        full_step, self.evaluate = compiled(None)
        self.states = {"ours": initial_state()}
        self.train = {"ours": full_step}
        if draft_vocab:
            ids = frequent_token_ids(batch["tokens"][batch["segment_ids"] > 0], target.arch.vocab_size, draft_vocab,
                                     target.arch.eos_token_ids)
            self.states["ours_reduced"] = initial_state()
            self.train["ours_reduced"] = compiled(ids)[0]
        rows_sharding = batch_spec(mesh, rules, 1)
        self.online = {k: jax.device_put(v[None], rows_sharding) for k, v in batch.items()}
        # Offline: the target's features of the batch, stored bfloat16 as the feature cache stores them.
        forward = jax.jit(lambda p, t, pos, s: nnx.merge(target_graphdef, p)(
            t, pos, segment_causal_mask(s), return_logits=False).hidden)
        features = np.asarray(forward(self.target_params, batch["tokens"], batch["positions"],
                                      batch["segment_ids"])).astype(ml_dtypes.bfloat16)
        self.features = features
        self.offline = {**self.online, "features": jax.device_put(features[None], rows_sharding)}

    def eval_loss(self) -> float:
        return float(self.evaluate(self.states["ours"].params, self.target_params, self.online, None)["loss"])

    def step(self, variant: str, side: str = "ours") -> float:
        # An unlogged step, as the training loop runs most steps: loss terms only, no agreement
        # metrics (the PyTorch step computes none either).
        self.states[side], metrics = self.train[side](self.states[side], self.target_params,
                                                      self.online if variant == "online" else self.offline, False)
        return float(metrics["loss"])  # waits for the step


class Theirs:
    """The PyTorch step of benchmarks/_torch_eagle.py on the HF target from the same GGUF."""

    def __init__(self, batch: dict, features, initial_params: dict):
        import _torch_eagle
        import numpy as np
        import torch
        from transformers import AutoModelForCausalLM

        from flatspec_jax import assets

        self.torch = torch
        torch.manual_seed(0)
        gguf = assets.smollm2_gguf()
        start = time.perf_counter()
        target = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                      local_files_only=True)
        self.load_s = time.perf_counter() - start
        head = _torch_eagle.EagleHead.for_target(target.config)
        head.load_from_ours(initial_params)  # the same starting point as ours
        self.trainer = _torch_eagle.TorchEagleTrainer(target, head)
        self.inputs = _torch_eagle.packed_inputs({**batch, "features": np.asarray(features, np.float32)}, noise=0.2)
        self.threads = torch.get_num_threads()

    def eval_loss(self) -> float:
        return self.trainer.eval_loss(self.inputs)

    def step(self, variant: str) -> float:
        return self.trainer.step(self.inputs, online=variant == "online")


def step_flops(arch, rows: int, row_length: int, online: bool) -> float:
    """Approximate FLOPs of one step (both sides do the same work): matmuls only, attention computed in full
    (masked, not skipped) as both implementations do."""
    d, n, h, v = arch.hidden_size, arch.num_heads, arch.head_dim, arch.vocab_size
    tokens = rows * row_length
    layer_params = layer_matmul_params(arch)
    attention = 4 * rows * row_length ** 2 * n * h  # scores + probabilities x values, per layer, forward
    target = 2 * layer_params * tokens * arch.num_layers + attention * arch.num_layers
    head = 3 * (2 * (layer_params + 2 * d * d) * tokens + attention)  # forward + backward
    lm_head = 3 * 2 * v * d * tokens  # target logits of f_{t+1}, draft logits, their gradient w.r.t. the input
    return (target if online else 0) + head + lm_head


def gemm_rates(tokens: int, hidden: int, vocab: int, repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of the LM-head-sized matmul [tokens, D] x [D, V] in XLA and in PyTorch (median of repeats):
    the step is dominated by matmuls, so this bounds what either side can reach on this machine."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a = np.random.default_rng(0).standard_normal((tokens, hidden), np.float32)
    b = np.random.default_rng(1).standard_normal((vocab, hidden), np.float32)
    matmul = jax.jit(lambda x, y: jnp.einsum("td,vd->tv", x, y))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    matmul(ja, jb).block_until_ready()
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    torch.nn.functional.linear(ta, tb)
    flops = 2.0 * tokens * hidden * vocab
    xla, pt = [], []
    for _ in range(repeats):
        xla.append(timed(lambda: matmul(ja, jb).block_until_ready())[0])
        pt.append(timed(lambda: torch.nn.functional.linear(ta, tb))[0])
    return {"xla_gflop_s": flops / statistics.median(xla) / 1e9, "pytorch_gflop_s": flops / statistics.median(pt) / 1e9}


def timed(fn, *args) -> tuple[float, float]:
    start = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - start, value


def run(args) -> dict:
    import jax
    import torch

    gate = wait_for_quiet(args.max_load, args.max_wait)  # before this script's own loading and compiling
    print(f"[bench] load average {gate['load_at_start']:.2f} before loading", file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    batch, batch_info = real_batch(args.rows, args.row_length, args.limit, work)
    print(f"[bench] batch {batch_info}", file=sys.stderr, flush=True)
    ours = Ours(batch, args.rows, args.row_length, args.loss_chunk, args.draft_vocab)
    theirs = Theirs(batch, ours.features, ours.initial_params)
    print(f"[bench] models loaded (ours {ours.load_s:.1f} s, transformers {theirs.load_s:.1f} s)", file=sys.stderr,
          flush=True)

    # The same step? Loss of the initial head on the batch, no noise, target forward included.
    compile_eval_s, ours_loss = timed(ours.eval_loss)
    theirs_loss = theirs.eval_loss()
    agreement = {"ours": ours_loss, "pytorch": theirs_loss, "rel_diff": abs(ours_loss - theirs_loss) / abs(theirs_loss)}
    print(f"[bench] initial loss (no noise): ours {ours_loss:.6f}, pytorch {theirs_loss:.6f}", file=sys.stderr,
          flush=True)
    if agreement["rel_diff"] > LOSS_AGREEMENT_RTOL:
        raise SystemExit(f"the two steps disagree on the loss: {agreement}")

    results = {}
    steppers = {side: functools.partial(ours.step, side=side) for side in ours.train}
    steppers["pytorch"] = theirs.step
    for variant in ("online", "offline"):
        warm = {f"{side}_first_step_s": timed(steppers[side], variant)[0] for side in ours.train}  # compiles
        warm.update({side: [] for side in steppers})
        for _ in range(args.warmup):
            for side, step in steppers.items():
                warm[side].append(timed(step, variant)[0])
        times = {side: [] for side in steppers}
        losses = {side: [] for side in steppers}
        loads = [load1()]
        for i in range(args.steps):
            for side, step in steppers.items():
                seconds, loss = timed(step, variant)
                times[side].append(seconds)
                losses[side].append(loss)
            loads.append(load1())
            print(f"[bench] {variant} step {i + 1}/{args.steps}: "
                  + ", ".join(f"{side} {t[-1]:.2f} s" for side, t in times.items()) + f" (load {loads[-1]:.2f})",
                  file=sys.stderr, flush=True)
        medians = {side: statistics.median(t) for side, t in times.items()}
        tokens_per_s = {side: batch_info["tokens"] / m for side, m in medians.items()}
        flops = step_flops(ours.arch, args.rows, args.row_length, variant == "online")
        results[variant] = {"step_s": times, "median_step_s": medians, "tokens_per_s": tokens_per_s,
                            "ratio": tokens_per_s["ours"] / tokens_per_s["pytorch"], "warmup": warm,
                            "losses": losses, "load_during": loads, "approx_flops_per_step": flops,
                            "gflop_s": {side: flops / medians[side] / 1e9 for side in ("ours", "pytorch")}}
        if "ours_reduced" in medians:
            results[variant]["reduced_vocab_speedup"] = medians["ours"] / medians["ours_reduced"]
    results["gemm_probe"] = gemm_rates(args.rows * args.row_length, ours.arch.hidden_size, ours.arch.vocab_size)

    return {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "jax": jax.__version__, "jax_devices": [str(d) for d in jax.devices()],
                        "torch": torch.__version__, "torch_threads": theirs.threads},
            "settings": {"rows": args.rows, "row_length": args.row_length, "steps": args.steps, "warmup": args.warmup,
                         "limit": args.limit, "draft_vocab": args.draft_vocab,
                         "target": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
                         "draft": "EAGLE head, 1 decoder layer, float32", "loss": "SmoothL1 + 0.1 soft CE",
                         "metrics": "loss terms only on both sides (an unlogged step)",
                         "optimizer": "AdamW (0.9, 0.95), wd 0.01, norm clip 0.5", "noise": 0.2},
            "batch": batch_info, "initial_loss_agreement": agreement, "ours_eval_compile_and_run_s": compile_eval_s,
            "load_gate": gate, "load_after": load1(), "goal_ratio": GOAL_RATIO, "results": results,
            "peak_rss_mib": self_rss_mib()}


def report(res: dict) -> None:
    b, g = res["batch"], res["load_gate"]
    print(f"\nEAGLE training step, SmolLM2-135M target, one packed batch {b['shape'][0]} x {b['shape'][1]} of ShareGPT "
          f"({b['samples']} samples, {b['tokens']} tokens, {b['assistant_tokens']} assistant), "
          f"{res['machine']['cpus']} CPUs; load {g['load_at_start']:.2f} before loading "
          f"({'quiet' if g['quiet'] else 'NOT quiet'}: limit {g['max_load']}, waited {g['waited_s']:.0f} s), "
          f"{res['load_after']:.2f} after")
    rows = []
    for variant in ("online", "offline"):
        r = res["results"][variant]
        for side, label in (("pytorch", "PyTorch eager + transformers"), ("ours", "flatspec_jax jitted step")):
            rows.append([f"{variant}: {label}", f"{r['median_step_s'][side]:.2f}",
                         " ".join(f"{t:.2f}" for t in r["step_s"][side]), f"{r['tokens_per_s'][side]:.0f}",
                         f"{r['gflop_s'][side]:.0f}", f"{r['ratio']:.2f}x" if side == "ours" else "1.00x"])
    print_table(f"median of {res['settings']['steps']} steps after warm-up, interleaved",
                ["step", "median s", "all steps s", "tokens/s", "~GFLOP/s", "vs PyTorch"], rows)
    for variant in ("online", "offline"):
        r = res["results"][variant]
        if "reduced_vocab_speedup" in r:
            print(f"{variant}: ours with draft.vocab={res['settings']['draft_vocab']} "
                  f"{r['median_step_s']['ours_reduced']:.2f} s per step, {r['reduced_vocab_speedup']:.2f}x our "
                  f"full-vocabulary step ({r['tokens_per_s']['ours_reduced']:.0f} tokens/s)")
    gemm = res["results"]["gemm_probe"]
    print(f"matmul probe [{b['shape'][0] * b['shape'][1]}, D] x [D, V]: XLA {gemm['xla_gflop_s']:.0f} GFLOP/s, "
          f"PyTorch {gemm['pytorch_gflop_s']:.0f} GFLOP/s (the steps are matmul-bound)")
    a = res["initial_loss_agreement"]
    print(f"same step: initial loss without noise ours {a['ours']:.6f} vs PyTorch {a['pytorch']:.6f} "
          f"(rel. diff {a['rel_diff']:.1e})")
    for variant in ("online", "offline"):
        r = res["results"][variant]
        print(f"goal {variant}: ratio {r['ratio']:.2f} (goal >= {res['goal_ratio']}) -> "
              f"{'met' if r['ratio'] >= res['goal_ratio'] else 'NOT met'}")


def main() -> int:
    parser = benchmark_parser(__doc__, "train.json")
    parser.add_argument("--rows", type=int, default=4, help="packed rows per step")
    parser.add_argument("--row-length", type=int, default=512, help="tokens per row (also data.max_length)")
    parser.add_argument("--limit", type=int, default=48, help="ShareGPT conversations to pack rows from")
    parser.add_argument("--loss-chunk", type=int, help="train.loss_chunk of our step (default: the config's)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side and variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side after ours has compiled")
    parser.add_argument("--draft-vocab", type=int, default=4096,
                        help="also time our step with draft.vocab of this size (0: skip it)")
    args = parser.parse_args()
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[name] = "1"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    results = run(args)
    out = write_results(results, args.out)
    report(results)
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
