#!/usr/bin/env bash
# Reproduce the SIA results in docs/results/sia/ (CPU, about an hour on 1 thread).
# Full outputs go to runs/sia/; the small files (summaries, plots) are copied to docs/results/sia/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONSAFEPATH=1
sia=".venv/bin/entropy-gpu sia --model smollm2 --seed 0"
$sia --dataset gsm8k --limit 50 --traces gold --estimator next_token --random-twin \
     --out runs/sia/gsm8k_gold_next_token
$sia --dataset gsm8k --limit 50 --traces gold --estimator sampled --num-samples 16 --max-answer-tokens 6 \
     --random-twin --out runs/sia/gsm8k_gold_sampled
$sia --dataset arc_easy --limit 200 --traces greedy --estimator choices --max-new-tokens 160 \
     --out runs/sia/arc_easy_greedy_choices
for run in gsm8k_gold_next_token gsm8k_gold_sampled arc_easy_greedy_choices; do
  (cd runs/sia && find "$run" \( -name '*.json' -o -name '*.png' \) -exec install -D -m 644 {} ../../docs/results/sia/{} \;)
done
