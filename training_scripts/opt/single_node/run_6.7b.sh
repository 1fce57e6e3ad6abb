#!/usr/bin/env bash
# OPT-6.7b, full fine-tuning on one node (assumed: 8x A100 40 GB or larger).
# Weights, gradients and Adam states take ~16 bytes/parameter = 107 GB: ZeRO-3 shards them to
# ~13 GB per GPU, and gradient checkpointing keeps batch-4 activations within the rest.
#
#   bash training_scripts/opt/single_node/run_6.7b.sh [OUTPUT] [ZERO_STAGE] [extra main.py flags...]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=SCRIPTDIR/../../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"
parse_launcher_args 3 "$@"
single_node_launcher

run_logged "${LAUNCHER[@]}" "$MAIN" \
    --config "$RECIPES/opt_single_node.yaml" \
    --model_name_or_path facebook/opt-6.7b \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --learning_rate 9.65e-6 \
    --weight_decay 0. \
    --num_train_epochs 16 \
    --gradient_accumulation_steps 1 \
    --gradient_checkpointing \
    --zero_stage "$ZERO_STAGE" \
    --deepspeed \
    --output_dir "$OUTPUT" \
    "${EXTRA_ARGS[@]}"
