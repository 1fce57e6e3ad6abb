#!/usr/bin/env bash
# The embedded CPU demo: build a tiny OPT, its tokenizer and a small instruction data set
# (once), fine-tune it on CPU, then compare the untrained and fine-tuned models side by side.
#
#   bash training_scripts/opt/cpu/run_tiny.sh [OUTPUT] [ZERO_STAGE] [extra main.py flags...]
#
# With --chat_template (e.g. the demo's ChatML template, utils/demo/chatml.jinja) it trains
# on multi-turn conversations instead and compares answers to multi-turn prompts:
#
#   bash training_scripts/opt/cpu/run_tiny.sh ./output_chat --chat_template utils/demo/chatml.jinja
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=SCRIPTDIR/../../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"
# A flag where ZERO_STAGE would be means the stage was left out (the chat command above).
if [[ ${2:-} == -* ]]; then
    set -- "$1" 0 "${@:2}"
fi
# Checked before the demo is built, so a wrong argument is named at once.
parse_launcher_args 0 "${1:-./output_tiny}" "${@:2}"
EMBEDDED=${EMBEDDED:-$REPO_ROOT/embedded}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# One thread: a 1M-parameter model's steps are too small to split, and on a busy 2-core
# machine a second thread's spin-waits made each step 4x slower (0.96 s vs 0.23 s measured).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

DATA=$EMBEDDED/data
PROMPTS=$EMBEDDED/prompts.txt
for arg in "${EXTRA_ARGS[@]}"; do
    if [[ $arg == --chat_template || $arg == --chat_template=* ]]; then
        DATA=$EMBEDDED/data_chat
        PROMPTS=$EMBEDDED/chat_prompts.jsonl
    fi
done

(cd "$REPO_ROOT" && python -m utils.demo.embedded --out "$EMBEDDED")

run_logged python "$MAIN" \
    --config "$RECIPES/opt_cpu.yaml" \
    --model_name_or_path "$EMBEDDED/tiny-opt" \
    --data_path "$DATA" \
    --per_device_train_batch_size 8 \
    --per_device_eval_batch_size 16 \
    --learning_rate 2e-3 \
    --num_train_epochs 20 \
    --zero_stage "$ZERO_STAGE" \
    --output_dir "$OUTPUT" \
    "${EXTRA_ARGS[@]}"

# The fine-tuned folder carries its chat template (if trained with one): prompt_eval
# prompts both models through it by default.
python "$REPO_ROOT/prompt_eval.py" \
    --model_name_or_path_baseline "$EMBEDDED/tiny-opt" \
    --model_name_or_path_finetune "$OUTPUT" \
    --prompts "$PROMPTS" \
    --max_new_tokens 32 2>&1 | tee "$OUTPUT/prompt_eval.log"
