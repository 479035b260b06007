#!/usr/bin/env bash
# The GPU checks, run on a lent accelerator machine (one NVIDIA GPU, its own python3 with JAX,
# PyTorch and transformers, no network) in consecutive calls while it stays warm (stage1, stage2,
# optionally stage3), because the tool that sends files there takes at most 64 MiB per call and
# the embedded GGUF alone is 94 MiB:
#
#   bash benchmarks/gpu_check.sh prepare RUN_DIR   # here, in the project's environment: fills .whl,
#                                                  # .xfer1 and .xfer2 (git-ignored) from the embedded
#                                                  # assets and RUN_DIR's trained draft head
#   bash benchmarks/gpu_check.sh stage1   # carry .whl and .xfer1: wheels the image lacks, the first
#                                        # half of the xz-compressed GGUF, a ShareGPT subset;
#                                        # installs and reports versions; RUN_TESTS=1 also runs the
#                                        # decoding tests on the GPU (~100 s; they passed there on
#                                        # 2026-12-04, and the three stages share 15 minutes)
#   bash benchmarks/gpu_check.sh stage2   # carry .xfer2: the GGUF's second half, a draft checkpoint;
#                                        # bench_decode and bench_flatness --device-throughput;
#                                        # DECODE_SET="--set decode.scan_layers=true" (for one) adds
#                                        # settings to bench_decode's, e.g. if per-layer decoding's
#                                        # longer compilation does not fit the time limit
#   bash benchmarks/gpu_check.sh stage3   # no carry: bench_verify_cost, then training throughput at
#                                        # the full config
#
# Each stage exits non-zero when any of its steps failed or ran out of time.
#
# Each stage must follow the previous one on the same machine while it is still warm (the tool
# keeps it 30 s after a call): the earlier stages leave their files in /root.
# Results and logs go to $OUT (at most 8 files come back).
set -uo pipefail
STASH=/root/stash
GGUF=/root/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
OUT=${OUT:-/tmp/gpu_out}
[ "${1:-}" = prepare ] || mkdir -p "$STASH" "$OUT"  # the machine's folders, not made by prepare here
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FLATSPEC_CACHE_DIR=/root/cache TF_CPP_MIN_LOG_LEVEL=2

prepare() {
  local run gguf tree wheels=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  run=$(realpath "$1") || return 1
  cd "$(dirname "$0")/.." || return 1
  rm -rf .whl .xfer1 .xfer2 && mkdir -p .xfer1 .xfer2
  python -m pip download -q "${wheels[@]}" -d .whl grain==0.2.18 array_record==0.8.6 gguf==0.19.0 \
    portpicker==1.6.0 tensorboardX==2.6.5 nvidia-mtbench-evaluator==26.3 || return 1
  python -m pip download -q "${wheels[@]}" -d .xfer1/fallback flax==0.12.8 optax==0.2.8 \
    orbax-checkpoint==0.12.8 || return 1
  gguf=$(python -c "from flatspec_jax import assets; print(assets.smollm2_gguf())") || return 1
  xz -9 -T2 -c "$gguf" | split -b 48000000 -d - .xfer1/gguf.xz.part && mv .xfer1/gguf.xz.part01 .xfer2/ || return 1
  [ ! -e .xfer1/gguf.xz.part02 ] || { echo "the compressed GGUF needs three parts; stage2 reads two" >&2; return 1; }
  sha256sum "$gguf" | cut -c1-64 > .xfer2/gguf.sha256 || return 1
  # The head's parameters only (no optimizer state: 15 MB instead of 45), its metadata kept.
  python - "$run" <<'PY' || return 1
import sys
from pathlib import Path
from flax import nnx
from flatspec_jax.checkpoint.manager import read_meta, save_draft_params
from flatspec_jax.config import load_config
from flatspec_jax.stages.common import RunContext
run = Path(sys.argv[1]).absolute()
ctx = RunContext(load_config("configs/smollm2_sharegpt_demo.yaml", [f"run_dir={run}", "mesh.data=1"]))
step, meta = read_meta(run / "checkpoints")
save_draft_params(Path(".xfer2/draft/checkpoints"), nnx.state(ctx.draft_head(), nnx.Param),
                  {**meta, "source": f"{run}/checkpoints/{step}"}, step=step)
PY
  python - <<'PY' | xz -9 -T2 > .xfer1/sharegpt_4000.jsonl.xz || return 1
import itertools, json
from flatspec_jax import assets
from flatspec_jax.data.sources import iter_json_array
for record in itertools.islice(iter_json_array(assets.sharegpt_json()), 4000):
    print(json.dumps(record, ensure_ascii=False))
PY
  # What each call carries: the tracked working tree plus its payload, at most 64 MiB.
  tree=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
  for payload in ".whl .xfer1" ".xfer2"; do
    local bytes
    bytes=$(( tree + $(du -cb $payload | tail -n 1 | cut -f1) ))
    echo "carry $payload with the tree: $bytes bytes"
    [ "$bytes" -le $((64 * 1024 * 1024)) ] || { echo "over the 64 MiB a call carries" >&2; return 1; }
  done
}

imports_ok() {
  python3 -c "import jax, flatspec_jax.decoding.runner, flatspec_jax.stages.common, flatspec_jax.stages.score, \
flatspec_jax.stages.train, flatspec_jax.stages.select; print('devices', jax.devices())"
}

stage1() {
  cp -r .xfer1/. "$STASH"/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site .whl/*.whl
  nvidia-smi -L
  python3 -V
  python3 -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda[0-9]+-plugin|flax|optax|orbax-checkpoint|transformers|torch|numpy|tokenizers) '
  echo "export PYTHONPATH=/root/site:$PWD" > "$STASH/env.sh"
  . "$STASH/env.sh"
  if ! imports_ok; then
    echo "the image's flax/optax/orbax fail with this package; installing the pinned ones"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site \
      "$STASH"/fallback/*.whl
    imports_ok || return 1
  fi
  [ -n "${RUN_TESTS:-}" ] || return 0
  JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -x -q -p no:cacheprovider tests/test_speculative.py \
    tests/test_spec_blocks.py > "$OUT/stage1_tests.log" 2>&1
  local status=$?
  tail -n 15 "$OUT/stage1_tests.log"
  return $status
}

stage2() {
  local failed=0
  . "$STASH/env.sh"
  mkdir -p "$(dirname "$GGUF")"
  cat "$STASH"/gguf.xz.part00 .xfer2/gguf.xz.part01 | xz -dc > "$GGUF" || return 1
  echo "$(cat .xfer2/gguf.sha256)  $GGUF" | sha256sum -c - || return 1
  rm -rf /root/draft && cp -r .xfer2/draft /root/draft
  # Greedy outputs are compared token for token: float32 matmuls in full precision (no TF32).
  # Few decoders: on 2026-12-04 six (AR, five speculative) plus transformers' generate did not get
  # through warm-up and 20 prompts in 250 s (the scorer's first batch alone compiled in ~38 s there).
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout 300 python3 benchmarks/bench_decode.py --run-dir /root/draft \
    --set model.path="$GGUF" ${DECODE_SET:-} --limit 20 --max-new-tokens 128 --max-wait 0 \
    --variant chain2:method=chain,gamma=2 --variant tree16:method=tree,depth=4,top_k=4,total_tokens=16 \
    --out "$OUT/decode_gpu.json" > "$OUT/decode.log" 2>&1 || failed=1
  grep -E "^\[bench\]|^[a-z_0-9]+ +[0-9.]+ +[0-9.]+ " "$OUT/decode.log"
  # Flatness scoring's steady-state tokens/s and TFLOP/s at the full config's shapes (bfloat16,
  # 16 rows of 2,048 tokens) on the first 2,000 ShareGPT conversations.
  mkdir -p /root/data && xz -dc "$STASH/sharegpt_4000.jsonl.xz" > /root/data/sharegpt_4000.jsonl
  timeout 200 python3 benchmarks/bench_flatness.py --device-throughput --limit 2000 --max-length 2048 --rows 16 \
    --dtype bfloat16 --passes 2 --max-wait 0 --set data.source=/root/data/sharegpt_4000.jsonl \
    --set model.path="$GGUF" --set score.row_length=2048 --out "$OUT/flatness_gpu.json" > "$OUT/flatness.log" 2>&1 ||
    { failed=1; tail -n 20 /tmp/bench_flatness_device_*/ours.err >> "$OUT/flatness.log" 2>/dev/null; }
  tail -n 9 "$OUT/flatness.log"
  return $failed
}

stage3() {
  # The verify forward's cost by tokens checked (T = 1 .. 64 against one autoregressive step), then
  # training throughput at the full config (online features, bfloat16, 32,768 tokens per step) on
  # the SFDD half of 500 conversations; needs stage2's GGUF and data on the same warm machine.
  local failed=0
  . "$STASH/env.sh"
  # As bench_decode runs (full-precision float32), ten forwards per timed call so that the host's
  # dispatch of the ~300 weight and cache buffers, ~1 ms on a GPU, does not flatten the curve.
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 python3 benchmarks/bench_verify_cost.py --set model.path="$GGUF" \
    --max-wait 0 --tokens 2 3 5 8 16 32 64 --repeat 10 --out "$OUT/verify_cost_gpu.json" \
    > "$OUT/verify_cost.log" 2>&1 || failed=1
  tail -n 15 "$OUT/verify_cost.log"
  local full=(--config configs/smollm2_sharegpt_full.yaml --run-dir /root/runs/full500 --set model.path="$GGUF"
              --set data.source=/root/data/sharegpt_4000.jsonl --set data.limit=500 --set data.heldout=16)
  timeout 120 python3 -m flatspec_jax.cli score "${full[@]}" > "$OUT/score.log" 2>&1 &&
    timeout 60 python3 -m flatspec_jax.cli select "${full[@]}" >> "$OUT/score.log" 2>&1 ||
    { tail -n 5 "$OUT/score.log"; return 1; }
  timeout 200 python3 -m flatspec_jax.cli train "${full[@]}" --set train.steps=200 --set train.log_every=25 \
    --set train.eval_every=100000 --set train.save_every=100000 > "$OUT/train.log" 2>&1 || failed=1
  echo "train failed: $failed"
  cp /root/runs/full500/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null
  tail -n 3 "$OUT/train_metrics.jsonl" 2>/dev/null  # the first window (steps 1-25) includes compilation
  return $failed
}

"$@"
