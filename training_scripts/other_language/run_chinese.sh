#!/usr/bin/env bash
# Chinese SFT on one node (assumed: 8x A100 40 GB): BLOOM-1b1, a multilingual model whose
# tokenizer covers Chinese well, on the Chinese data sets. They are SFT-only question/answer
# sets (no preference pairs), so --data_split 10,0,0 trains on every row.
#
#   bash training_scripts/other_language/run_chinese.sh [OUTPUT] [ZERO_STAGE] [extra main.py flags...]
set -euo pipefail
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
parse_launcher_args 2 "$@"
single_node_launcher

run_logged "${LAUNCHER[@]}" "$MAIN" \
    --config "$RECIPES/other_language.yaml" \
    --data_path wangrui6/Zhihu-KOL Cohere/miracl-zh-queries-22-12 Hello-SimpleAI/HC3-Chinese mkqa-Chinese \
    --model_name_or_path bigscience/bloom-1b1 \
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
