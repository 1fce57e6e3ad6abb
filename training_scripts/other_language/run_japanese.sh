#!/usr/bin/env bash
# Japanese SFT on one node (assumed: 8x A100 40 GB): mGPT (1.3B, GPT-2 architecture with a
# fast multilingual tokenizer that covers Japanese) on the Japanese data sets, all SFT-only,
# so --data_split 10,0,0 trains on every row. rinna/japanese-gpt-1b also works
# (pip install sentencepiece for its tokenizer).
#
#   bash training_scripts/other_language/run_japanese.sh [OUTPUT] [ZERO_STAGE] [extra main.py flags...]
set -euo pipefail
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
parse_launcher_args 2 "$@"
single_node_launcher

run_logged "${LAUNCHER[@]}" "$MAIN" \
    --config "$RECIPES/other_language.yaml" \
    --data_path mkqa-Japanese Cohere/miracl-ja-queries-22-12 lmqg/qg_jaquad lmqg/qag_jaquad \
    --model_name_or_path ai-forever/mGPT \
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
