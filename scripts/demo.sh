#!/usr/bin/env bash
# Quickstart 1: set everything up and run the main job on built-in defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/entropy-gpu demo "$@"
