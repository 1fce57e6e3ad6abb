#!/usr/bin/env bash
# Llama-2-7b, full fine-tuning on one node (assumed: 8x A100 40 GB or larger; the gated
# meta-llama weights need `huggingface-cli login` first). ZeRO-3 shards the ~108 GB of
# training state; gradient checkpointing bounds the activations.
#
#   bash training_scripts/llama2/run_llama2_7b.sh [OUTPUT] [ZERO_STAGE] [extra main.py flags...]
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
    --zero_stage "$ZERO_STAGE" \
    --deepspeed \
    --output_dir "$OUTPUT" \
    "${EXTRA_ARGS[@]}"
