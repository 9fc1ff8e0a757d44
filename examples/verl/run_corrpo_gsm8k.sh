#!/usr/bin/env bash
# CorR-PO GRPO on GSM8K with verl 0.9.x, a few steps on one GPU (docs/usage/corrpo-verl.md).
#
#   MODEL=/models/Qwen2.5-0.5B-Instruct DATA=~/data/gsm8k bash examples/verl/run_corrpo_gsm8k.sh
#
# Needs: a CUDA GPU, verl 0.9.x with its rollout engine (pip install "verl[vllm]" or vllm
# installed; ROLLOUT=sglang for SGLang), entropy-gpu installed in the same environment,
# the model on disk and the parquet files of examples/verl/prepare_gsm8k.py.
# Extra arguments are passed to verl as more overrides (e.g. trainer.logger='["console","wandb"]').
# ARM picks the reward term, all else equal (the arms of docs/results/corrpo_training/):
#   corrpo (default): GRPO on reward + COEF * (-rho), rho of entropy and nll_grad_norm
#   grpo: plain GRPO (the entropy_gpu kernels stay on); corrpo_flipped: reward + COEF * (+rho);
#   entropy_bonus: plain GRPO with verl's own entropy bonus (actor.entropy_coeff=ENTROPY_COEF).
# SEED (default 0) seeds verl's data order and rollouts; run each arm with the same seeds.
set -euo pipefail
MODEL="${MODEL:-}"
DATA="${DATA:-$HOME/data/gsm8k}"
STEPS="${STEPS:-5}"
GPUS="${GPUS:-1}"
ROLLOUT="${ROLLOUT:-vllm}"
ARM="${ARM:-corrpo}"
SEED="${SEED:-0}"
COEF="${COEF:-0.1}"
ENTROPY_COEF="${ENTROPY_COEF:-0.001}"

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
case "$ROLLOUT" in vllm|sglang) ;; *) die "ROLLOUT must be vllm or sglang, got '$ROLLOUT'" ;; esac
case "$ARM" in grpo|corrpo|corrpo_flipped|entropy_bonus) ;;
  *) die "ARM must be grpo, corrpo, corrpo_flipped or entropy_bonus, got '$ARM'" ;; esac
[[ "$SEED" =~ ^[0-9]+$ ]] || die "SEED must be a whole number, got '$SEED'"
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
# entropy-gpu's verl.plugins entry point; this variable tells it what to do. Ray workers of
# a local cluster inherit it; on a multi-node cluster also pass it in the Ray runtime env
# (the +ray_kwargs override below).
entropy_coeff=0
case "$ARM" in
  grpo|entropy_bonus)
    export ENTROPY_GPU_VERL=kernels
    estimator=(algorithm.adv_estimator=grpo)
    if [ "$ARM" = entropy_bonus ]; then entropy_coeff="$ENTROPY_COEF"; fi ;;
  corrpo|corrpo_flipped)
    export ENTROPY_GPU_VERL=corrpo
    phi=negate; if [ "$ARM" = corrpo_flipped ]; then phi=identity; fi
    estimator=(algorithm.adv_estimator=corrpo_grpo
               +algorithm.corrpo.coef="$COEF"
               +algorithm.corrpo.phi="$phi"
               +algorithm.corrpo.measure=nll_grad_norm) ;;
esac

python3 -m verl.trainer.main_ppo \
  "${estimator[@]}" \
  algorithm.use_kl_in_reward=False \
  algorithm.norm_adv_by_std_in_grpo=True \
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
  actor_rollout_ref.actor.data_loader_seed="$SEED" \
  actor_rollout_ref.rollout.seed="$SEED" \
  data.seed="$SEED" \
  actor_rollout_ref.rollout.name="$ROLLOUT" \
  actor_rollout_ref.rollout.n=4 \
  actor_rollout_ref.rollout.temperature=1.0 \
  actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.5 \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
  actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8 \
  trainer.critic_warmup=0 \
  trainer.val_before_train=False \
  trainer.logger='["console"]' \
  trainer.project_name=entropy_gpu_corrpo \
  trainer.experiment_name="gsm8k_${ARM}_s${SEED}" \
  trainer.n_gpus_per_node="$GPUS" \
  trainer.nnodes=1 \
  trainer.save_freq=-1 \
  trainer.test_freq=-1 \
  trainer.total_training_steps="$STEPS" \
  +ray_kwargs.ray_init.runtime_env.env_vars.ENTROPY_GPU_VERL="$ENTROPY_GPU_VERL" \
  "$@"
