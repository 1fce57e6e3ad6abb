"""Whether an optional kernel package (flash-attn, Liger-Kernel) can be used on this machine.

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
