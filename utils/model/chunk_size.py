"""How many positions a chunk of the chunked loss holds (utils/model/chunked_loss.py).

One rule for the run (utils/model/loss.py `decide_loss_path`, from the GPU's memory as torch
reports it at run time) and the memory planner (from --gpu_memory_gb).
"""

from __future__ import annotations

import torch

TILE = 128  # chunk rows: a multiple of the matrix kernels' tile, so only the last is partial
CPU_CHUNK_BYTES = 2**26  # fp32 logits per chunk on a CPU: 64 MiB
GPU_MEMORY_SHARE = 256  # on a GPU, 1/256 of its memory: 550 MB on an H200, 312 MB at 80 GB
MAX_CHUNK_TOKENS = 16384


def default_chunk_tokens(vocab_size: int, device_memory: int | None) -> int:
    """Positions per chunk: fp32 logits of CPU_CHUNK_BYTES on a CPU (`device_memory` None),
    of 1/GPU_MEMORY_SHARE of a GPU's memory (bytes) on a GPU, rounded down to a multiple of
    TILE rows, between TILE and MAX_CHUNK_TOKENS. On a GPU a micro-batch is then one chunk
    or a few (about 2,700 positions at OPT's vocabulary on an H200): each chunk is a dozen kernel
    launches and a partly filled tile."""
    budget = CPU_CHUNK_BYTES if device_memory is None else device_memory // GPU_MEMORY_SHARE
    rows = budget // (4 * vocab_size) // TILE * TILE
    return max(TILE, min(MAX_CHUNK_TOKENS, rows))


def accelerator_memory(device_type: str) -> int | None:
    """Bytes of memory of this process's GPU as torch reports it at run time; None on a CPU."""
    if device_type != "cuda":
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
