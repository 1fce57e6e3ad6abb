#!/usr/bin/env bash
# The embedded CPU demo: build a tiny OPT, its tokenizer and a small instruction data set
# (once), fine-tune it on CPU, then compare the untrained and fine-tuned models side by side.
#
#   bash training_scripts/opt/cpu/run_tiny.sh [OUTPUT] [ZERO_STAGE] [extra main.py flags...]
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=SCRIPTDIR/../../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"
# Checked before the demo is built, so a wrong argument is named at once.
parse_launcher_args 0 "${1:-./output_tiny}" "${@:2}"
EMBEDDED=${EMBEDDED:-$REPO_ROOT/embedded}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

(cd "$REPO_ROOT" && python -m utils.demo.embedded --out "$EMBEDDED")

run_logged python "$MAIN" \
    --model_name_or_path "$EMBEDDED/tiny-opt" \
    --data_path "$EMBEDDED/data" \
    --data_split 10,0,0 \
    --max_seq_len 128 \
    --per_device_train_batch_size 8 \
    --per_device_eval_batch_size 16 \
    --learning_rate 2e-3 \
    --num_warmup_steps 20 \
    --num_train_epochs 20 \
    --zero_stage "$ZERO_STAGE" \
    --output_dir "$OUTPUT" \
    "${EXTRA_ARGS[@]}"

python "$REPO_ROOT/prompt_eval.py" \
    --model_name_or_path_baseline "$EMBEDDED/tiny-opt" \
    --model_name_or_path_finetune "$OUTPUT" \
    --prompts "$EMBEDDED/prompts.txt" \
    --max_new_tokens 32 2>&1 | tee "$OUTPUT/prompt_eval.log"
