#!/usr/bin/env bash
# The GPU checks, run on a lent accelerator machine (one NVIDIA GPU, its own python3 with JAX,
# PyTorch and transformers, no network) in two calls, because the tool that sends files there
# takes at most 64 MiB per call and the embedded GGUF alone is 94 MiB:
#
#   bash benchmarks/gpu_check.sh stage1   # carry .whl and .xfer1: wheels the image lacks, the first
#                                        # half of the xz-compressed GGUF, a ShareGPT subset;
#                                        # installs, reports versions, runs decoding tests on the GPU
#   bash benchmarks/gpu_check.sh stage2   # carry .xfer2: the GGUF's second half, a draft checkpoint;
#                                        # bench_decode, flatness scoring and training throughput
#
# stage2 must follow stage1 on the same (still warm) machine: stage1 leaves its files in /root/stash.
# Results and logs go to $OUT (at most 8 files come back).
set -uo pipefail
STASH=/root/stash
GGUF=/root/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$STASH" "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FLATSPEC_CACHE_DIR=/root/cache TF_CPP_MIN_LOG_LEVEL=2

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
  [ -n "${SKIP_TESTS:-}" ] && return 0
  JAX_PLATFORMS=cuda timeout 100 python3 -m pytest -x -q -p no:cacheprovider tests/test_speculative.py \
    tests/test_spec_blocks.py 2>&1 | tail -n 15
}

stage2() {
  . "$STASH/env.sh"
  mkdir -p "$(dirname "$GGUF")"
  cat "$STASH"/gguf.xz.part00 .xfer2/gguf.xz.part01 | xz -dc > "$GGUF" || return 1
  echo "$(cat .xfer2/gguf.sha256)  $GGUF" | sha256sum -c - || return 1
  rm -rf /root/draft && cp -r .xfer2/draft /root/draft
  # Greedy outputs are compared token for token: float32 matmuls in full precision (no TF32).
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout 250 python3 benchmarks/bench_decode.py --run-dir /root/draft \
    --set model.path="$GGUF" --limit 20 --max-new-tokens 128 --max-wait 0 \
    --variant chain2:method=chain,gamma=2 --variant chain4:method=chain,gamma=4 \
    --variant tree6:method=tree,depth=3,top_k=2,total_tokens=6 \
    --variant tree16:method=tree,depth=4,top_k=4,total_tokens=16 \
    --variant tree63:method=tree,depth=5,top_k=8,total_tokens=63 \
    --out "$OUT/decode_h200.json" > "$OUT/decode.log" 2>&1
  tail -n 12 "$OUT/decode.log"
  # Flatness scoring and training throughput at the full config's shapes (bfloat16, 2048-token
  # rows) on the first 2,000 ShareGPT conversations.
  mkdir -p /root/data && xz -dc "$STASH/sharegpt_4000.jsonl.xz" > /root/data/sharegpt_4000.jsonl
  local full=(--config configs/smollm2_sharegpt_full.yaml --run-dir /root/runs/full4000 --set model.path="$GGUF"
              --set data.source=/root/data/sharegpt_4000.jsonl --set data.limit=2000)
  local start=$SECONDS
  timeout 60 python3 -m flatspec_jax.cli score "${full[@]}" > "$OUT/score.log" 2>&1
  echo "score exit $? after $((SECONDS - start)) s"
  grep -E "scoring [0-9]+ samples|wrote .*scores|scores:" "$OUT/score.log"
  python3 -m flatspec_jax.cli select "${full[@]}" > /dev/null 2>&1
  start=$SECONDS
  timeout 70 python3 -m flatspec_jax.cli train "${full[@]}" --set train.steps=200 --set train.log_every=25 \
    --set train.eval_every=100000 --set train.save_every=100000 > "$OUT/train.log" 2>&1
  echo "train exit $? after $((SECONDS - start)) s"
  cp /root/runs/full4000/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null
  tail -n 3 "$OUT/train_metrics.jsonl" 2>/dev/null
  tail -n 5 "$OUT/train.log"
}

"$@"
