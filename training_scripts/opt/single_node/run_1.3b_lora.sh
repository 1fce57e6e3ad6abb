#!/usr/bin/env bash
# OPT-1.3b with LoRA on one node (assumed: 8x A100 40/80 GB): only rank-128 adapters on the
# decoder layers train, so optimizer states are tiny and ZeRO stage 0 suffices; adapters
# take a far higher learning rate than full fine-tuning.
#
#   bash training_scripts/opt/single_node/run_1.3b_lora.sh [OUTPUT] [ZERO_STAGE] [extra main.py flags...]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=SCRIPTDIR/../../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"
parse_launcher_args 0 "$@"
single_node_launcher

run_logged "${LAUNCHER[@]}" "$MAIN" \
    --config "$RECIPES/opt_single_node.yaml" \
    --model_name_or_path facebook/opt-1.3b \
    --per_device_train_batch_size 8 \
    --per_device_eval_batch_size 8 \
    --learning_rate 1e-3 \
    --weight_decay 0.1 \
    --num_train_epochs 16 \
    --gradient_accumulation_steps 1 \
    --lora_dim 128 \
    --lora_module_name decoder.layers. \
    --only_optimize_lora \
    --zero_stage "$ZERO_STAGE" \
    --deepspeed \
    --output_dir "$OUTPUT" \
    "${EXTRA_ARGS[@]}"
