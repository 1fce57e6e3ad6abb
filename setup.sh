#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv with everything the tool needs.
#
#   bash setup.sh            # then: . .venv/bin/activate
#
# On a CPU-only machine torch is installed first, as a pinned release, so the loose range
# in requirements.txt is already satisfied and pip never pulls a multi-GB CUDA build.
# Set TORCH_SPEC to choose another torch (e.g. TORCH_SPEC="torch==2.6.0" on a CUDA 12.4 box).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip

if ! python -c "import torch" 2>/dev/null; then
    python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install --quiet -r requirements-dev.txt

# DeepSpeed compiles its CPU kernels (Adam, shared-memory collectives) on first use; do it
# now so the first training run starts at once. GPU machines compile their own at first use.
python - <<'PY'
from deepspeed.accelerator import get_accelerator

if get_accelerator().device_name() == "cpu":
    from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder

    CPUAdamBuilder().load()
    ShareMemCommBuilder().load()
PY
echo "Set up. Activate with: . .venv/bin/activate"
