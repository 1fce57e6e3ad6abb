"""The DeepSpeed configuration: built from the flags as a plain dict, a --deepspeed_config
file merged over it, and the one object every consumer reads the effective settings from."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from utils.engine.config import EngineConfig, TrainConfig
from utils.errors import UserError
from utils.observe.config import ObserveConfig


@dataclass(frozen=True)
class EngineSetup:
    """The merged DeepSpeed config and what it decides.

    A --deepspeed_config file may override any key, so the ZeRO stage, precision and offload
    are read from here (or from the engine once it exists), never from the flags: model
    initialisation, saving, checkpoint checks, the summary and the memory plan then all agree
    with what DeepSpeed trains.
    """

    config: dict
    dtype_reason: str  # why this precision (the summary prints it)

    @property
    def zero_stage(self) -> int:
        return int(self.config.get("zero_optimization", {}).get("stage", 0))

    @property
    def dtype(self) -> str:
        for dtype in ("fp16", "bf16"):
            if self.config.get(dtype, {}).get("enabled"):
                return dtype
        if self.autocast:
            return AUTOCAST_DTYPES.get(str(self.config["torch_autocast"].get("dtype")), "fp32")
        return "fp32"

    @property
    def autocast(self) -> bool:
        """Whether 16 bits come from torch.autocast (fp32 weights, 16-bit matrix products)."""
        return bool(self.config.get("torch_autocast", {}).get("enabled"))

    @property
    def offload(self) -> bool:
        """Whether the optimizer states (and parameters, if set) live in CPU memory."""
        zero = self.config.get("zero_optimization", {})
        return any(
            (zero.get(key) or {}).get("device", "none") == "cpu"
            for key in ("offload_optimizer", "offload_param")
        )


AUTOCAST_DTYPES = {"bfloat16": "bf16", "torch.bfloat16": "bf16", "bf16": "bf16",
                   "float16": "fp16", "torch.float16": "fp16", "fp16": "fp16"}  # fmt: skip
CPU_BF16_AUTOCAST = (
    "via torch.autocast (fp32 weights, bf16 matrix products): at ZeRO stage 0 DeepSpeed's "
    "bf16 mode keeps bf16 weights beside an fp32 master copy and fp32 gradient copies, "
    "about 4x fp32's memory between steps (bench/cpu_bf16.py)"
)


def uses_cpu_autocast(dtype: str, on_cuda: bool, zero_stage: int) -> bool:
    """bf16 on a CPU at ZeRO stage 0 trains through torch.autocast, not DeepSpeed's bf16 mode.

    There DeepSpeed wraps the optimizer in FP16_UnfusedOptimizer: bf16 weights and gradients,
    an fp32 master copy and fp32 copies of all gradients at every step, ~20-24 bytes per
    parameter against fp32's 16, so bf16 used more memory than fp32 (issue 14). Autocast
    keeps fp32 weights and gradients (no copy) and runs matrix products in bf16. At ZeRO
    1-3 DeepSpeed's bf16 optimizer partitions its master copy: no such penalty.
    """
    return dtype == "bf16" and not on_cuda and zero_stage == 0


def build_ds_config(
    engine: EngineConfig,
    train: TrainConfig,
    observe: ObserveConfig,
    world_size: int,
    dtype: str,
    *,
    on_cuda: bool,
) -> dict:
    """ZeRO stage, offload, precision, batch geometry, clipping and TensorBoard.

    `dtype` is the resolved precision (fp32, fp16 or bf16); `on_cuda` whether it trains on
    GPUs (bf16 on a CPU at ZeRO-0 goes through torch.autocast: `uses_cpu_autocast`). A
    --deepspeed_config file, if given, is merged over the result so its keys win.
    """
    geometry = train.geometry(world_size)
    zero: dict = {
        "stage": engine.zero_stage,
        # Parameters small enough to stay whole on every rank at ZeRO-3 (saves gathers).
        "stage3_param_persistence_threshold": 1e4,
        "stage3_max_live_parameters": 3e7,
        "stage3_prefetch_bucket_size": 3e7,
        "memory_efficient_linear": False,
    }
    if engine.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if engine.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_batch_size": geometry.global_batch,
        "train_micro_batch_size_per_gpu": geometry.micro,
        "gradient_accumulation_steps": geometry.accumulation,
        # We log ourselves; DeepSpeed's own periodic prints would interleave with ours.
        "steps_per_print": 2**31 - 1,
        "zero_optimization": zero,
        "fp16": {"enabled": dtype == "fp16", "loss_scale_window": 100},
        # bf16 has fp32's range: no loss scale to adjust, so no per-step scan of every
        # gradient for inf/NaN (a kernel pair per tensor, an all-reduce and a host sync).
        # A NaN or inf loss stops the run instead (utils/engine/loss_watch.py).
        "bf16": {"enabled": dtype == "bf16", "check_grad_overflow": False},
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronizes the device at every forward and every
        # step, for figures it prints only every steps_per_print (never): ours are the meter's.
        "timers": {"throughput": {"enabled": False}},
    }
    if uses_cpu_autocast(dtype, on_cuda, engine.zero_stage):
        config["bf16"] = {"enabled": False}
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if observe.enable_tensorboard:
        config["tensorboard"] = {
            "enabled": True,
            "output_path": os.path.join(observe.tensorboard_path, "ds_tensorboard_logs"),
            "job_name": "step1_model_tensorboard",
        }
    if engine.deepspeed_config:
        config = _merge(config, load_user_ds_config(engine.deepspeed_config))
    return config


def load_user_ds_config(path: str) -> dict:
    try:
        with open(path) as f:
            user = json.load(f)
    except OSError as err:
        raise UserError(f"--deepspeed_config {path!r} cannot be read ({err.strerror}).") from err
    except json.JSONDecodeError as err:
        raise UserError(f"--deepspeed_config {path!r} is not valid JSON: {err}.") from err
    if not isinstance(user, dict):
        raise UserError(f"--deepspeed_config {path!r} must hold a JSON object.")
    return user


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


BATCH_KEYS = {
    "train_micro_batch_size_per_gpu": "--per_device_train_batch_size",
    "gradient_accumulation_steps": "--gradient_accumulation_steps",
}


def setup_problems(
    setup: EngineSetup, train: TrainConfig, world_size: int, user_file: str | None, on_cuda: bool
) -> list[str]:
    """What in the merged config (flags, then --deepspeed_config over them) cannot train right.

    The file goes through the same checks as the flags: a key it overrides must not
    contradict a flag (the loader, the schedule and the summary read the flags' values), and
    the stage, precision and offload it asks for must work here.
    """
    config, problems = setup.config, []
    where = f" (from --deepspeed_config {user_file})" if user_file else ""
    if setup.zero_stage not in (0, 1, 2, 3):
        problems.append(f"ZeRO stage {setup.zero_stage}{where} does not exist; use 0, 1, 2 or 3.")
    flags = {"train_micro_batch_size_per_gpu": train.per_device_train_batch_size}
    flags["gradient_accumulation_steps"] = train.gradient_accumulation_steps
    for key, flag in BATCH_KEYS.items():
        if config.get(key) != flags[key]:
            problems.append(
                f"--deepspeed_config {user_file} sets {key} {config.get(key)}, but {flag} is "
                f"{flags[key]}; remove the key from the file or pass {flag} {config.get(key)}."
            )
    expected = train.geometry(world_size).global_batch
    if config.get("train_batch_size") != expected:
        problems.append(
            f"--deepspeed_config {user_file} sets train_batch_size {config.get('train_batch_size')}, "
            f"but micro-batch x ranks x accumulation is {expected}; remove the key from the file "
            "(it follows from the flags)."
        )
    if config.get("fp16", {}).get("enabled") and config.get("bf16", {}).get("enabled"):
        problems.append(f"fp16 and bf16 are both enabled{where}; enable one.")
    elif setup.dtype == "fp16" and not on_cuda:
        problems.append(
            f"fp16 is enabled{where}, but CPUs have no fp16 training path; use bf16 or fp32."
        )
    zero = config.get("zero_optimization", {})
    if setup.offload and setup.zero_stage == 0:
        problems.append(
            f"--offload{where} needs ZeRO stage 1 or more: at stage 0 DeepSpeed would run its "
            "CPU Adam on weights that stay on the GPU. Add --zero_stage 2 (or 3)."
        )
    if (zero.get("offload_param") or {}).get("device", "none") != "none" and setup.zero_stage != 3:
        problems.append(f"offload_param{where} needs ZeRO stage 3; use --zero_stage 3.")
    return problems
