#!/usr/bin/env bash
# OPT-1.3b on one GPU: full fine-tuning plus LoRA adapters, on DeepSpeed-Chat's
# default data (Dahoas/rm-static). Assumes one 48 GB+ GPU (A6000, A100): ZeRO stage 0, bf16/fp16.
#
#   bash training_scripts/opt/single_gpu/run_1.3b.sh [OUTPUT] [ZERO_STAGE] [extra main.py flags...]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=SCRIPTDIR/../../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"
parse_launcher_args 0 "$@"
single_gpu_launcher

run_logged "${LAUNCHER[@]}" "$MAIN" \
    --config "$RECIPES/opt_single_gpu.yaml" \
    --model_name_or_path facebook/opt-1.3b \
    --gradient_accumulation_steps 8 \
    --lora_dim 128 \
    --enable_tensorboard \
    --tensorboard_path "$OUTPUT" \
    --zero_stage "$ZERO_STAGE" \
    --deepspeed \
    --output_dir "$OUTPUT" \
    "${EXTRA_ARGS[@]}"
