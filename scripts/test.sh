#!/usr/bin/env bash
# Quickstart 2: set up and run the whole test suite (CPU; Triton kernels through
# TRITON_INTERPRET=1), then a smoke run of the benchmarks on tiny shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/pytest tests "$@"
BENCH_SMOKE=1 .venv/bin/pytest benchmarks --benchmark-disable -q -p no:cacheprovider
