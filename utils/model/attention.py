"""Which attention implementation the model runs (--attn_implementation), and why.

`auto` keeps transformers' default (PyTorch's scaled_dot_product_attention where the model
has it, else eager) except in one case: --packing on a CUDA GPU training in 16 bits with
FlashAttention-2 installed, for a model type packing supports. There FlashAttention-2's
variable-length path packs without padding or mask (utils/data/packing.py, collate_flat),
where sdpa needs a 4D block-diagonal mask (a masked kernel, memory quadratic in the packed
length). Elsewhere it is not chosen silently: not measured here (no GPU machine at hand).
"""

from __future__ import annotations

import importlib.util

from utils.data.packing import PACKING_SUPPORT, VARLEN_ATTENTION

FLASH_ATTENTION = "flash_attention_2"


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attention(
    requested: str,
    *,
    model_type: str,
    packing: bool,
    on_cuda: bool,
    dtype: str,
    flash_installed: bool,
) -> tuple[str | None, str]:
    """(the implementation to ask transformers for, None for its default; why, in words)."""
    if requested != "auto":
        return requested, f"--attn_implementation {requested}"
    if (
        packing
        and on_cuda
        and dtype in ("bf16", "fp16")
        and flash_installed
        and model_type in PACKING_SUPPORT
    ):
        return FLASH_ATTENTION, (
            "auto: --packing on a GPU with FlashAttention-2 installed packs without padding "
            "or mask (its variable-length path)"
        )
    return None, "auto: transformers' default (sdpa where the model has it, else eager)"


def flash_attention_problems(requested: str, *, on_cuda: bool, flash_installed: bool) -> list[str]:
    """Why --attn_implementation flash_attention_2 cannot run on this machine, with the fix."""
    if requested != FLASH_ATTENTION or (on_cuda and flash_installed):
        return []
    return [
        f"--attn_implementation {FLASH_ATTENTION} needs a CUDA GPU and the flash-attn package "
        "(pip install flash-attn --no-build-isolation); use sdpa here."
    ]


def attention_dtype_problems(attention: str | None, dtype: str) -> list[str]:
    """FlashAttention-2 computes in 16 bits only; `dtype` is what the merged config trains in."""
    if attention != FLASH_ATTENTION or dtype in ("bf16", "fp16"):
        return []
    return [
        f"--attn_implementation {FLASH_ATTENTION} runs only in 16 bits, but this run trains in "
        f"{dtype}; add --dtype bf16 (or fp16), or use --attn_implementation sdpa."
    ]


def uses_flat_packs(packing: bool, attention: str | None) -> bool:
    """Whether packed batches go without mask or padding (per-example boundaries instead)."""
    return packing and attention in VARLEN_ATTENTION
