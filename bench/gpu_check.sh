#!/usr/bin/env bash
# One call of a lent GPU answers everything (bench/gpu_check/driver.py says what it runs):
#   bash bench/gpu_check.sh --out DIR          on a CUDA machine (OPT-1.3B's shape; under 8 min on an H200)
#   bash bench/gpu_check.sh --tiny --out DIR   on any CPU, a minute or two (what CI runs)
# The exact device call (wheels, model builder, data) is in README.md, "Speed".
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec python3 -m bench.gpu_check.driver "$@"
