"""Which precision a run trains in, and the sentence that says why (the run summary prints it).

On GPUs: bf16 only where it is native (compute capability 8.0 and up: A100, H100, L4...);
`torch.cuda.is_bf16_supported()` also counts the emulation on V100/T4, which is slow, so
those get fp16. On CPUs: bf16 only where the CPU has AMX-bf16 (Intel Sapphire Rapids and
later): there a bf16 training step measured 1.6x faster than fp32 with the same eval loss;
without it bf16 is emulated and trained about 5x slower than fp32 (bench/throughput.py).
The CPU is judged by what torch reports at run time, never by a table of CPU names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NATIVE_BF16_CAPABILITY = (8, 0)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_features() -> dict[str, bool]:
    """{"amx_bf16", "avx512_bf16", "amx_usable"} as this torch build can tell.

    torch >= 2.10 has torch.cpu.get_capabilities(); earlier releases (2.3 on) only private
    probes, some under torch._C._cpu. AMX-tile comes with AMX-bf16 on every CPU that has it,
    so it stands in for it where only the former is reported. The kernel must also grant a
    process the AMX registers (Linux 5.16+): torch.cpu._init_amx() asks and says whether it
    may use them.
    """
    features = {"amx_bf16": False, "avx512_bf16": False, "amx_usable": True}
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        caps = get_capabilities()
        features["amx_bf16"] = bool(caps.get("amx_bf16") or False)
        features["avx512_bf16"] = bool(caps.get("avx512_bf16") or False)
    else:
        features["amx_bf16"] = _probe("_is_amx_tile_supported")
        features["avx512_bf16"] = _probe("_is_avx512_bf16_supported")
    if features["amx_bf16"]:
        init_amx = _find("_init_amx")
        features["amx_usable"] = bool(init_amx()) if init_amx is not None else True
    return features


def _find(name: str) -> Callable[[], bool] | None:
    for home in (torch.cpu, getattr(torch._C, "_cpu", None)):
        probe = getattr(home, name, None) if home is not None else None
        if probe is not None:
            return probe
    return None


def _probe(name: str) -> bool:
    probe = _find(name)
    return bool(probe()) if probe is not None else False


def cpu_bf16_capability(features: dict[str, bool] | None = None) -> tuple[bool, str]:
    """(whether bf16 trains faster than fp32 on this CPU, the reason in words)."""
    f = cpu_features() if features is None else features
    if f["amx_bf16"] and f["amx_usable"]:
        return True, "the CPU has AMX-bf16 (bf16 matrix units)"
    if f["amx_bf16"]:
        return False, "the CPU has AMX-bf16 but the OS does not grant its use (Linux >= 5.16)"
    if f["avx512_bf16"]:
        return False, "the CPU has AVX512-bf16 but no AMX (bf16 not measured faster there)"
    return False, "the CPU has no bf16 matrix units (no AMX-bf16)"


def resolve_dtype(
    requested: str,
    on_cuda: bool,
    cuda_capability: tuple[int, int] | None,
    cpu_bf16: tuple[bool, str],
) -> tuple[str, str]:
    """(fp32 | fp16 | bf16, why). `requested` is --dtype; only "auto" is decided here."""
    if requested != "auto":
        return requested, f"{requested}, as --dtype asked"
    if on_cuda:
        if cuda_capability is not None and cuda_capability >= NATIVE_BF16_CAPABILITY:
            major, minor = cuda_capability
            return "bf16", f"bf16: the GPU (compute capability {major}.{minor}) has native bf16"
        shown = "unknown" if cuda_capability is None else "{}.{}".format(*cuda_capability)
        return "fp16", (
            f"fp16: the GPU's compute capability ({shown}) is below 8.0, where bf16 is only "
            "emulated (slow)"
        )
    has_bf16, why = cpu_bf16
    if has_bf16:
        return "bf16", f"bf16: {why}; bf16 trains faster than fp32 there"
    return "fp32", f"fp32: {why}; bf16 beats fp32 on a CPU only with AMX (--dtype bf16 to try)"


def detect_dtype(requested: str) -> tuple[str, str]:
    """resolve_dtype for this machine's accelerator (GPU 0 or the CPU)."""
    if torch.cuda.is_available():
        return resolve_dtype(requested, True, torch.cuda.get_device_capability(0), (False, ""))
    if requested != "auto":  # probe nothing the answer does not need
        return resolve_dtype(requested, False, None, (False, ""))
    return resolve_dtype(requested, False, None, cpu_bf16_capability())
