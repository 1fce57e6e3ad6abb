"""Which precision a run trains in: the flag, or for 'auto' what this machine runs well."""

from __future__ import annotations

import torch

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(requested: str, on_cuda: bool, bf16_supported: bool) -> tuple[str, str]:
    """(dtype, why): 'auto' picks bf16 (else fp16) on GPUs, fp32 on CPU."""
    if requested != "auto":
        return requested, f"--dtype {requested}"
    if on_cuda:
        if bf16_supported:
            return "bf16", "--dtype auto: this GPU supports bf16"
        return "fp16", "--dtype auto: this GPU has no bf16"
    # Measured (bench/throughput.py): on a CPU without AMX, bf16 trains ~5x slower than fp32.
    return "fp32", "--dtype auto: fp32 on CPU"
