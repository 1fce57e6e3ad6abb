#!/usr/bin/env bash
# Llama-2-7b with LoRA on one node (assumed: 8x A100 40 GB or larger; gated weights: log in
# first). LLaMA names its blocks model.layers.N (OPT: model.decoder.layers.N), so LoRA wraps
# modules matching "layers."; only the rank-128 adapters train.
#
#   bash training_scripts/llama2/run_llama2_7b_lora.sh [OUTPUT] [ZERO_STAGE] [extra main.py flags...]
set -euo pipefail
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
parse_launcher_args 3 "$@"
single_node_launcher

run_logged "${LAUNCHER[@]}" "$MAIN" \
    --config "$RECIPES/llama2.yaml" \
    --model_name_or_path meta-llama/Llama-2-7b-hf \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --learning_rate 9.65e-6 \
    --weight_decay 0. \
    --num_train_epochs 4 \
    --gradient_accumulation_steps 1 \
    --gradient_checkpointing \
    --lora_dim 128 \
    --lora_module_name layers. \
    --only_optimize_lora \
    --zero_stage "$ZERO_STAGE" \
    --deepspeed \
    --output_dir "$OUTPUT" \
    "${EXTRA_ARGS[@]}"
