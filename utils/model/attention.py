"""Which attention implementation the model runs (--attn_implementation), and why.

`auto` keeps transformers' default (PyTorch's scaled_dot_product_attention where the model
has it, else eager) except for --packing on a CUDA GPU, where sdpa needs a 4D block-diagonal
mask: it computes every score between packed examples, then masks it (21.9% MFU on an
H200, bench/gpu_check.sh). There `auto` takes, in this order:

- flash_attention_2, training in 16 bits where flash-attn imports: its variable-length path
  packs without padding or mask (utils/data/packing.py, "flat");
- flex_attention, for a model type packing checked with it: FlexAttention's block mask,
  built from the restarting position ids (utils/model/document_mask.py), skips the blocks
  between examples. flash-attn has no wheel for most torch/CUDA pairs; flex_attention is
  part of PyTorch. It has no attention dropout, and no backward pass on a CPU.

On a CPU, sdpa stays: flex_attention cannot train there, and FlashAttention-2 needs CUDA.
"""

from __future__ import annotations

from utils.data.packing import FLEX_ATTENTION, PACKING_SUPPORT
from utils.model.kernels import FLASH_ATTN, import_error

FLASH_ATTENTION = "flash_attention_2"
DEFAULT = "auto: transformers' default (sdpa where the model has it, else eager)"


def flash_attn_error() -> str | None:
    """Why flash-attn cannot be used here (it does not import), or None when it can."""
    return import_error(FLASH_ATTN)


def resolve_attention(
    requested: str,
    *,
    model_type: str,
    packing: bool,
    on_cuda: bool,
    dtype: str,
    attention_dropout: float,
    flash_error: str | None,
) -> tuple[str | None, str]:
    """(the implementation to ask transformers for, None for its default; why, in words).

    `dtype`: what the merged config trains in; `attention_dropout`: the model config's
    (after --dropout); `flash_error`: `flash_attn_error()`."""
    if requested != "auto":
        return requested, f"--attn_implementation {requested}"
    if not (packing and on_cuda) or model_type not in PACKING_SUPPORT:
        return None, DEFAULT
    sixteen_bits = dtype in ("bf16", "fp16")
    if sixteen_bits and flash_error is None:
        return FLASH_ATTENTION, (
            "auto: --packing on a GPU where flash-attn imports: FlashAttention-2 packs without "
            "padding or mask (its variable-length path)"
        )
    no_flash = (
        f"flash-attn: {flash_error}"
        if flash_error
        else f"FlashAttention-2 needs 16 bits, not {dtype}"
    )
    if FLEX_ATTENTION not in PACKING_SUPPORT[model_type]:
        no_flex = f"no flex_attention for model type {model_type!r}"
    elif attention_dropout:
        no_flex = f"flex_attention has no attention dropout (the model's is {attention_dropout})"
    else:
        return FLEX_ATTENTION, (
            f"auto: --packing on a GPU without FlashAttention-2 ({no_flash}); FlexAttention "
            "skips the blocks between packed examples"
        )
    return None, f"{DEFAULT}, packed examples kept apart by a 4D mask ({no_flash}; {no_flex})"


def flash_attention_problems(
    requested: str, *, on_cuda: bool, flash_error: str | None
) -> list[str]:
    """Why --attn_implementation flash_attention_2 cannot run on this machine, with the fix."""
    if requested != FLASH_ATTENTION or (on_cuda and flash_error is None):
        return []
    found = f" (here: {flash_error})" if flash_error else ""
    return [
        f"--attn_implementation {FLASH_ATTENTION} needs a CUDA GPU and the flash-attn package, "
        f"built for this torch (pip install flash-attn --no-build-isolation){found}; use sdpa "
        "here."
    ]


def attention_dtype_problems(attention: str | None, dtype: str) -> list[str]:
    """FlashAttention-2 computes in 16 bits only; `dtype` is what the merged config trains in."""
    if attention != FLASH_ATTENTION or dtype in ("bf16", "fp16"):
        return []
    return [
        f"--attn_implementation {FLASH_ATTENTION} runs only in 16 bits, but this run trains in "
        f"{dtype}; add --dtype bf16 (or fp16), or use --attn_implementation sdpa."
    ]


def flex_attention_problems(attention: str | None, *, on_cuda: bool, config) -> list[str]:
    """Why flex_attention cannot train this model here, with the fix. `config`: the model's
    (after --dropout)."""
    if attention != FLEX_ATTENTION:
        return []
    problems = []
    if not on_cuda:
        problems.append(
            f"--attn_implementation {FLEX_ATTENTION} trains only on a CUDA GPU (PyTorch's "
            "FlexAttention has no backward pass on a CPU); use sdpa here."
        )
    if not _supports_flex(config):
        problems.append(
            f"--attn_implementation {FLEX_ATTENTION}: transformers has no flex_attention for "
            f"model type {config.model_type!r}; use sdpa."
        )
    if dropout := getattr(config, "attention_dropout", 0.0):
        problems.append(
            f"--attn_implementation {FLEX_ATTENTION} has no attention dropout, and this model's "
            f"attention_dropout is {dropout} (set by --dropout, or in its config.json); drop "
            "--dropout (or set 0), or use --attn_implementation sdpa."
        )
    return problems


def _supports_flex(config) -> bool:
    """Whether transformers' causal LM class for `config` runs flex_attention (True when the
    class is not known here, e.g. remote code: transformers then says so itself)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return True
    return model_class._supports_flex_attn
