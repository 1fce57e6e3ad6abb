"""Which (precision, ZeRO stage, device) combinations train correctly, checked before any work.

Measured with two SGD steps (lr 1) through every DeepSpeed release line the requirements
allow, 0.16.9 to 0.19.8 (tests/engine/test_update_size.py repeats it for the installed version).
ZeRO stages 1-3 train correctly in fp32, bf16 and fp16 everywhere (with the tool's GPU
optimizer, torch's fused AdamW, too: tests/engine/test_optim.py). At stage 0 DeepSpeed wraps a
16-bit run's optimizer in FP16_Optimizer (for FusedAdam: the tool's GPU optimizer there,
utils/engine/optim.py) or FP16_UnfusedOptimizer (any other: the CPU Adam, on a CPU or when
offloading), and:

- fp16: 0.18.3 and later move the weights by 1/65,536 of the gradient (engine.backward
  stopped applying the loss scale the wrappers divide by; the scale then doubles every
  overflow-free window, clipping never triggers, nothing is reported); 0.17.6 to 0.18.1
  never apply FusedAdam's update at all (FP16_Optimizer.step returns before stepping).
  Only 0.16.x-0.17.5 and 0.18.2 train. Refused on every version: ZeRO stage 1 is the same
  training (one GPU: nothing to split; several: optimizer states split, less memory), the
  fix is one flag, and --zero_stage stays the one truth about the run (checkpoints, resume
  checks, summary) instead of a stage swapped in behind the user's back.
- bf16 with the unfused wrapper: 0.17.6 to 0.18.5 train wrongly (0.17.6-0.18.2 never clear
  the gradients, so each step adds every earlier step's gradient; 0.18.3-0.18.5 also
  divide by an fp16 loss scale of 65,536); fixed in 0.18.6. Refused on those versions
  with --offload (on a CPU without it the tool trains bf16 at stage 0 through
  torch.autocast, which keeps DeepSpeed's wrapper out).
- bf16 with FusedAdam, and fp32: correct everywhere.
"""

from __future__ import annotations

import re
from importlib.metadata import version

# DeepSpeed releases whose stage-0 unfused wrapper trains bf16 wrongly: from the release
# that moved bf16 into it (0.17.6) to the one that fixed it (0.18.6).
BF16_UNFUSED_BROKEN = ((0, 17, 6), (0, 18, 6))


def precision_problems(
    dtype: str,
    zero_stage: int,
    on_cuda: bool,
    bf16_supported: bool,
    offload: bool = False,
    requested: str | None = None,
    deepspeed_version: str | None = None,
) -> list[str]:
    """Problems with training in `dtype` at `zero_stage`, each naming the flag, value and fix.

    dtype: the resolved precision (fp32, fp16 or bf16) the engine will run;
    zero_stage: the effective stage (the merged DeepSpeed config's, not only the flag);
    bf16_supported: the GPU runs bf16 natively (compute capability 8.0 or newer);
    offload: --offload (the CPU Adam, as on a CPU);
    requested: the --dtype flag as given ("auto" words the message differently);
    deepspeed_version: defaults to the installed one.
    """
    flag = _dtype_flag(dtype, requested)
    if dtype == "fp16" and not on_cuda:
        return [f"{flag} needs a GPU (CPUs have no fp16 training path); use bf16 or fp32."]
    if dtype == "bf16" and on_cuda and not bf16_supported:
        return [
            f"{flag} is not supported by this GPU (bf16 needs compute capability 8.0 or "
            "newer); use --dtype fp16 with --zero_stage 1, 2 or 3."
        ]
    if zero_stage != 0:
        return []
    if dtype == "fp16":
        return [
            f"{flag} with --zero_stage 0 does not train: DeepSpeed's stage-0 fp16 optimizer "
            "divides every update by a loss scale (65536 and growing) that engine.backward "
            "no longer applies (DeepSpeed 0.18.3 and later; 0.17.6-0.18.1 skip the update). "
            "Use --zero_stage 1 (the same training; optimizer states split across GPUs)"
            + (", or --dtype bf16." if bf16_supported else ".")
        ]
    installed = deepspeed_version or version("deepspeed")
    # The unfused wrapper comes with the CPU Adam: with --offload. Without it, bf16 at
    # stage 0 on a CPU trains through torch.autocast (ds_config.uses_cpu_autocast).
    unfused = offload
    low, fixed = BF16_UNFUSED_BROKEN
    if dtype == "bf16" and unfused and low <= _release(installed) < fixed:
        return [
            f"{flag} with --zero_stage 0 and DeepSpeed's CPU Adam trains wrongly with "
            f"DeepSpeed {installed}: its stage-0 bf16 optimizer keeps adding old gradients "
            "(and from 0.18.3 divides updates by an fp16 loss scale). Use --zero_stage 1, or "
            "DeepSpeed 0.18.6 or later (pip install 'deepspeed>=0.18.6,<0.20')."
        ]
    return []


def _release(text: str) -> tuple[int, ...]:
    """'0.18.4' or '0.18.4+g1a2b3c' -> (0, 18, 4)."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(part) for part in match.groups()) if match else (0, 0, 0)


def _dtype_flag(dtype: str, requested: str | None) -> str:
    if requested == "auto" and dtype != "auto":
        return f"--dtype auto (which picks {dtype} here)"
    return f"--dtype {dtype}"
