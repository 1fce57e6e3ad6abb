#!/usr/bin/env bash
# OPT-66b across several nodes (assumed: 8 nodes of 8x A100 80 GB, listed in HOSTFILE).
# ZeRO-3 shards the ~1 TB of training state over every GPU; gradient checkpointing, batch 4
# and LoRA rank 128 (trained with the base weights) bound the rest.
#
# From one node with passwordless ssh to the others (DeepSpeed starts them via pdsh):
#   HOSTFILE=/job/hostfile bash training_scripts/opt/multi_node/run_66b.sh ./output
# Without ssh (SLURM and similar: run this once per node, e.g. under srun):
#   NODE_RANK=$SLURM_NODEID MASTER_ADDR=<first node> bash training_scripts/opt/multi_node/run_66b.sh
#
#   bash training_scripts/opt/multi_node/run_66b.sh [OUTPUT] [ZERO_STAGE] [extra main.py flags...]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=SCRIPTDIR/../../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"
parse_launcher_args 3 "$@"
multi_node_launcher

run_logged "${LAUNCHER[@]}" "$MAIN" \
    --config "$RECIPES/opt_multi_node.yaml" \
    --model_name_or_path facebook/opt-66b \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --learning_rate 1e-4 \
    --weight_decay 0.1 \
    --num_train_epochs 2 \
    --gradient_accumulation_steps 1 \
    --gradient_checkpointing \
    --lora_dim 128 \
    --lora_module_name decoder.layers. \
    --zero_stage "$ZERO_STAGE" \
    --deepspeed \
    --output_dir "$OUTPUT" \
    "${EXTRA_ARGS[@]}"
