#!/usr/bin/env bash
# Compare a baseline and a fine-tuned model on the built-in prompts (DeepSpeed-Chat's
# evaluation_scripts/run_prompt.sh). Usage:
#   bash evaluation_scripts/run_prompt.sh [BASELINE] [FINETUNE] [extra prompt_eval.py flags...]
# e.g. bash evaluation_scripts/run_prompt.sh facebook/opt-1.3b ./output --output comparison.md
set -euo pipefail

BASELINE_MODEL=${1:-facebook/opt-1.3b}
FINETUNED_MODEL=${2:-./output}
shift $(( $# < 2 ? $# : 2 ))

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}

exec "$PYTHON" "$REPO_ROOT/prompt_eval.py" \
    --model_name_or_path_baseline "$BASELINE_MODEL" \
    --model_name_or_path_finetune "$FINETUNED_MODEL" \
    "$@"
