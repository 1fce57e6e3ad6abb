#!/usr/bin/env bash
# One-shot GPU check (issue 14 item 6): real tokens/s, MFU and peak memory of padding to max,
# the default batches, packing and the chunked loss on an OPT-1.3B-shaped model, bf16, ZeRO-2.
#   bash bench/gpu_check.sh           on a CUDA machine (30 steps per run)
#   bash bench/gpu_check.sh --tiny    on any CPU, well under a minute (what CI runs)
# Needs the repository's requirements; DeepSpeed has no wheel on the index for every CUDA
# machine: `pip wheel --no-deps --no-build-isolation deepspeed==<version>` builds one to carry.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export HF_HUB_OFFLINE=1
exec python bench/gpu_check.py "$@"
