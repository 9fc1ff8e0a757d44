#!/usr/bin/env bash
# Download the wheels of benchmarks/gpu_wheels.txt into .whl/ (git-ignored), for a
# GPU machine with Python 3.12 on x86-64 and no network; benchmarks/gpu_run.sh
# installs them there with --no-index --no-deps. Run where PyPI is reachable.
# Sdist-only packages (antlr4-python3-runtime) are built into pure-Python wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
grep -v '^\s*#' benchmarks/gpu_wheels.txt | grep -v '^\s*$' | while read -r spec; do
  if ! "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
       "${platforms[@]}" -d .whl "$spec" 2>/dev/null; then
    echo "no wheel for $spec: building one (pure Python only)"
    "$py" -m pip wheel -q --no-deps -w .whl "$spec"
  fi
done
ls -la .whl
du -sh .whl
