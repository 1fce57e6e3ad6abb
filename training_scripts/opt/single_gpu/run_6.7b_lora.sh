#!/usr/bin/env bash
# OPT-6.7b on one GPU with LoRA: only the adapters train (rank 128 on the decoder layers),
# so the frozen fp16/bf16 weights (13 GB) plus activations under gradient checkpointing fit one
# 40/80 GB A100 at ZeRO stage 0; accumulation 16 gives a 128-sequence batch.
#
#   bash training_scripts/opt/single_gpu/run_6.7b_lora.sh [OUTPUT] [ZERO_STAGE] [extra main.py flags...]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=SCRIPTDIR/../../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"
parse_launcher_args 0 "$@"
single_gpu_launcher

run_logged "${LAUNCHER[@]}" "$MAIN" \
    --config "$RECIPES/opt_single_gpu.yaml" \
    --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
    --model_name_or_path facebook/opt-6.7b \
    --per_device_train_batch_size 8 \
    --per_device_eval_batch_size 8 \
    --learning_rate 1e-3 \
    --weight_decay 0. \
    --num_train_epochs 16 \
    --gradient_accumulation_steps 16 \
    --gradient_checkpointing \
    --lora_dim 128 \
    --lora_module_name decoder.layers. \
    --only_optimize_lora \
    --zero_stage "$ZERO_STAGE" \
    --deepspeed \
    --output_dir "$OUTPUT" \
    "${EXTRA_ARGS[@]}"
