#!/usr/bin/env bash
# Quickstart 2: set up and run the whole test suite (CPU; Triton kernels through
# TRITON_INTERPRET=1) after the linter, then a smoke run of the benchmarks on tiny shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# Lint first: it takes a second and fails fast (config in pyproject.toml, docs/architecture.md).
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest tests "$@"
BENCH_SMOKE=1 .venv/bin/python -m pytest benchmarks --benchmark-disable -q -p no:cacheprovider
