#!/usr/bin/env bash
# Runs one `flatspec` verb on every worker of an EXISTING Cloud TPU VM pod slice (creates nothing).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh train --config configs/llama3_8b_instruct_v5p.yaml
#
# Every worker must already have this repository at $REPO_DIR with its virtualenv
# (`bash launch/local.sh demo` once per worker, or a shared image) and see the model, data
# and run directory at the paths the config names (a shared mount or GCS fuse).
# JAX finds the pod's coordinator itself (jax.distributed.initialize on Cloud TPU), so the
# only flag added is distributed.enabled=true. Process 0 writes logs, scores and manifests;
# all processes write their shards of each orbax checkpoint.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the pod slice name}"
: "${ZONE:?set ZONE to its zone}"
[ $# -ge 1 ] || { echo "usage: TPU_NAME=.. ZONE=.. bash launch/tpu_pod.sh VERB [flatspec args...]" >&2; exit 2; }
repo_dir=${REPO_DIR:-'~/flatspec_jax'}
command="cd $repo_dir && .venv/bin/flatspec $(printf '%q ' "$@") --set distributed.enabled=true"
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$command"
