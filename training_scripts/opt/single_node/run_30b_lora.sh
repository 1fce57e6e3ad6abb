#!/usr/bin/env bash
# OPT-30b with LoRA on one node (assumed: 8x A100 80 GB). The frozen bf16 weights alone are
# 60 GB, so ZeRO-3 shards them (~7.5 GB per GPU); only the rank-128 adapters train (at
# --lora_learning_rate), and gradient checkpointing keeps batch-4 activations small.
#
#   bash training_scripts/opt/single_node/run_30b_lora.sh [OUTPUT] [ZERO_STAGE] [extra main.py flags...]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=SCRIPTDIR/../../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"
parse_launcher_args 3 "$@"
single_node_launcher

run_logged "${LAUNCHER[@]}" "$MAIN" \
    --config "$RECIPES/opt_single_node.yaml" \
    --model_name_or_path facebook/opt-30b \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --learning_rate 9.65e-6 \
    --weight_decay 0.1 \
    --num_train_epochs 1 \
    --gradient_accumulation_steps 1 \
    --gradient_checkpointing \
    --lora_dim 128 \
    --lora_module_name decoder.layers. \
    --only_optimize_lora \
    --zero_stage "$ZERO_STAGE" \
    --deepspeed \
    --output_dir "$OUTPUT" \
    "${EXTRA_ARGS[@]}"
