#!/usr/bin/env bash
# Quickstart 2: set up and run the whole test suite (CPU; Triton kernels through
# TRITON_INTERPRET=1) after the linter and a strict build of the documentation site, then a
# smoke run of the benchmarks on tiny shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,docs
# Lint first: it takes a second and fails fast (config in pyproject.toml, docs/architecture.md).
.venv/bin/python -m ruff check .
# The site (mkdocs.yml): fails on a broken link or anchor, a page left out of the nav, or a
# docstring the API reference cannot render. Output in site/ (git-ignored).
NO_MKDOCS_2_WARNING=1 .venv/bin/python -m mkdocs build --strict --quiet --site-dir site
.venv/bin/python -m pytest tests "$@"
BENCH_SMOKE=1 .venv/bin/python -m pytest benchmarks --benchmark-disable -q -p no:cacheprovider
