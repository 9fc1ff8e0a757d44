#!/usr/bin/env bash
# Reproduce the SIA results in docs/results/sia/ (CPU; about an hour with 1 thread on
# the shared 2-core machine they were measured on). Full outputs go to runs/sia/; the
# small files (summaries, plots, benchmark) are copied to docs/results/sia/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
sia=".venv/bin/entropy-gpu sia --model smollm2 --seed 0"
sia_bench=".venv/bin/entropy-gpu sia-bench --model smollm2"
$sia --dataset gsm8k --limit 50 --traces gold --estimator next_token --random-twin \
     --out runs/sia/gsm8k_gold_next_token
$sia --dataset gsm8k --limit 50 --traces gold --estimator sampled --num-samples 16 --max-answer-tokens 6 \
     --random-twin --out runs/sia/gsm8k_gold_sampled
$sia --dataset arc_easy --limit 200 --traces greedy --estimator choices --max-new-tokens 160 \
     --out runs/sia/arc_easy_greedy_choices
$sia_bench --dataset gsm8k --limit 40 --segment tokens --every 12 --min-steps 8 --max-traces 3 --repeats 2 \
     --out runs/sia/bench_one_pass.json
cp runs/sia/bench_one_pass.json docs/results/sia/
for run in gsm8k_gold_next_token gsm8k_gold_sampled arc_easy_greedy_choices; do
  (cd runs/sia && find "$run" \( -name '*.json' -o -name '*.png' \) -exec install -D -m 644 {} ../../docs/results/sia/{} \;)
done
