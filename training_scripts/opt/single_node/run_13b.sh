#!/usr/bin/env bash
# OPT-13b on one node (assumed: 8x A100 80 GB; on 40 GB cards add --offload).
# Full fine-tuning needs ~16 bytes/parameter = 208 GB of training state: ZeRO-3 shards it to
# ~26 GB per GPU; gradient checkpointing and batch 4 bound the activations. LoRA adapters
# (rank 128) train alongside the base weights; one epoch at 1e-4 is plenty at this size.
#
#   bash training_scripts/opt/single_node/run_13b.sh [OUTPUT] [ZERO_STAGE] [extra main.py flags...]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=SCRIPTDIR/../../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"
parse_launcher_args 3 "$@"
single_node_launcher

run_logged "${LAUNCHER[@]}" "$MAIN" \
    --config "$RECIPES/opt_single_node.yaml" \
    --model_name_or_path facebook/opt-13b \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --learning_rate 1e-4 \
    --weight_decay 0. \
    --num_train_epochs 1 \
    --gradient_accumulation_steps 1 \
    --gradient_checkpointing \
    --lora_dim 128 \
    --lora_module_name decoder.layers. \
    --zero_stage "$ZERO_STAGE" \
    --deepspeed \
    --output_dir "$OUTPUT" \
    "${EXTRA_ARGS[@]}"
