#!/usr/bin/env bash
# OPT-1.3b, full fine-tuning on one node (assumed: 8x A100 40/80 GB; NUM_GPUS=n for fewer).
# ZeRO-2 shards gradients and optimizer states; the weights (2.6 GB in bf16) stay whole.
#
#   bash training_scripts/opt/single_node/run_1.3b.sh [OUTPUT] [ZERO_STAGE] [extra main.py flags...]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=SCRIPTDIR/../../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"
parse_launcher_args 2 "$@"
single_node_launcher

run_logged "${LAUNCHER[@]}" "$MAIN" \
    --config "$RECIPES/opt_single_node.yaml" \
    --model_name_or_path facebook/opt-1.3b \
    --per_device_train_batch_size 8 \
    --per_device_eval_batch_size 8 \
    --learning_rate 9.65e-6 \
    --weight_decay 0. \
    --num_train_epochs 16 \
    --gradient_accumulation_steps 1 \
    --zero_stage "$ZERO_STAGE" \
    --deepspeed \
    --output_dir "$OUTPUT" \
    "${EXTRA_ARGS[@]}"
