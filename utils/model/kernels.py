"""Whether an optional kernel package (flash-attn, Liger-Kernel) can be used on this machine,
and which kernel computes the chunked loss.

Asked by importing it, never with `importlib.util.find_spec`: a wheel built for another
torch or CUDA is found but then fails to import (an undefined symbol, a missing CUDA
library, a version check), and a run that chose it would fail at its first step instead of
falling back. Each package is imported at most once per process.
"""

from __future__ import annotations

import functools
import importlib

FLASH_ATTN = "flash_attn"  # what transformers imports for flash_attention_2
LIGER_LOSS = "liger_kernel.transformers.fused_linear_cross_entropy"  # what the chunked loss uses

# What a broken build raises on import: ImportError (undefined symbol), OSError (a shared
# library that cannot be loaded), RuntimeError and AttributeError (a check or an API of
# another torch). Any of them means the same: not usable here, use the fallback.
BROKEN_IMPORT = (ImportError, OSError, RuntimeError, AttributeError)


@functools.cache
def import_error(module: str) -> str | None:
    """Why `module` cannot be imported here (the exception, in one line), or None when it can."""
    try:
        importlib.import_module(module)
    except BROKEN_IMPORT as err:
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


def loss_kernel(device_type: str, mode: str) -> tuple[str, str]:
    """Which kernel computes the chunked loss, and why not Liger where it could have:
    Liger-Kernel's fused linear cross-entropy (Triton) on CUDA where it imports, in the fused
    mode only (it computes the gradients in the forward pass, so at ZeRO-3 it would hold the
    whole weight-sized gradient until the backward); else this module's chunks."""
    if device_type != "cuda" or import_error(LIGER_LOSS) is not None:
        return "torch", ""
    if mode != "fused":
        return "torch", "Liger-Kernel unused: it keeps a weight-sized gradient until the backward"
    return "liger", ""
