"""Check every flag once, before any expensive work, and report all problems together.

`validate` is the one validation step of main.py: the flags, the model folder, the data
flags, the checkpoint flags and the merged DeepSpeed config. It returns the EngineSetup
every later step reads the effective ZeRO stage and precision from.
"""

from __future__ import annotations

import math
import os

import torch

from utils.config import Config
from utils.data.build import check_data_config
from utils.data.packing import packing_problems
from utils.engine.checkpoint import checkpoint_problems
from utils.engine.ds_config import EngineSetup, build_ds_config, setup_problems
from utils.engine.precision import NATIVE_BF16_CAPABILITY, detect_dtype
from utils.errors import ConfigError, UserError, format_problems
from utils.model.config import ModelConfig
from utils.model.load import load_model_config, max_positions
from utils.planner.config import PlannerConfig


def validate(cfg: Config) -> EngineSetup:
    """Every problem with the flags, at once (ConfigError, exit 2); else the engine setup."""
    from deepspeed.accelerator import get_accelerator

    on_cuda = get_accelerator().device_name() == "cuda"
    # Native bf16 only: torch.cuda.is_bf16_supported() also counts V100/T4's slow emulation.
    bf16 = on_cuda and torch.cuda.get_device_capability() >= NATIVE_BF16_CAPABILITY
    problems = flag_problems(cfg, on_cuda, bf16)
    setup = None
    if not problems:  # the DeepSpeed config is built from the flags: only from valid ones
        dtype, reason = detect_dtype(cfg.engine.dtype)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        try:
            config = build_ds_config(cfg.engine, cfg.train, cfg.observe, world_size, dtype)
            setup = EngineSetup(config=config, world_size=world_size, dtype_reason=reason)
            problems += setup_problems(setup, cfg.train, cfg.engine.deepspeed_config, on_cuda)
        except UserError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError(format_problems(problems))
    return setup


def flag_problems(cfg: Config, on_cuda: bool, bf16_supported: bool) -> list[str]:
    """All problems with the flags, each naming the flag, the value and the fix."""
    problems = []
    t, e, lo = cfg.train, cfg.engine, cfg.lora
    if e.zero_stage not in (0, 1, 2, 3):
        problems.append(f"--zero_stage {e.zero_stage} does not exist; use 0, 1, 2 or 3.")
    for flag, value in (
        ("--per_device_train_batch_size", t.per_device_train_batch_size),
        ("--per_device_eval_batch_size", t.per_device_eval_batch_size),
        ("--gradient_accumulation_steps", t.gradient_accumulation_steps),
        ("--num_train_epochs", t.num_train_epochs),
    ):
        if value < 1:
            problems.append(f"{flag} {value} must be at least 1.")
    if t.max_steps is not None and t.max_steps < 1:
        problems.append(f"--max_steps {t.max_steps} must be at least 1 (or left out).")
    if t.learning_rate <= 0:
        problems.append(f"--learning_rate {t.learning_rate} must be positive.")
    if t.num_warmup_steps < 0:
        problems.append(f"--num_warmup_steps {t.num_warmup_steps} must be 0 or more.")
    if not 0 < e.dist_timeout_minutes < math.inf:  # also refuses nan
        problems.append(
            f"--dist_timeout_minutes {e.dist_timeout_minutes} must be a positive number of "
            "minutes, e.g. 10."
        )
    if t.weight_decay < 0:
        problems.append(f"--weight_decay {t.weight_decay} must be 0 or more.")
    if cfg.model.dropout is not None and not 0 <= cfg.model.dropout < 1:
        problems.append(f"--dropout {cfg.model.dropout} must be in [0, 1).")
    if lo.lora_dim < 0:
        problems.append(f"--lora_dim {lo.lora_dim} must be 0 (off) or a positive rank.")
    if lo.only_optimize_lora and not lo.enabled:
        problems.append("--only_optimize_lora needs LoRA: add --lora_dim 128 (or another rank).")
    if lo.save_lora_adapter and not lo.enabled:
        problems.append("--save_lora_adapter needs LoRA: add --lora_dim 128 (or another rank).")
    problems += _planner_problems(cfg.planner)
    problems += check_data_config(cfg.data)
    problems += _dtype_problems(e.dtype, on_cuda, bf16_supported)
    if e.deepspeed_config and not os.path.isfile(e.deepspeed_config):
        problems.append(f"--deepspeed_config {e.deepspeed_config!r} does not exist.")
    if not (t.dry_run or cfg.planner.estimate_memory):
        problems += _output_dir_problems(t.output_dir)
    problems += _model_problems(cfg.model, cfg.data.max_seq_len, cfg.batch.packing)
    problems += checkpoint_problems(cfg.checkpoint)
    if cfg.batch.packing and cfg.batch.pad_to_max_len:
        problems.append("--packing and --pad_to_max_len exclude each other; choose one.")
    return problems


def _planner_problems(planner: PlannerConfig) -> list[str]:
    problems = []
    if planner.gpu_memory_gb <= 0:
        problems.append(f"--gpu_memory_gb {planner.gpu_memory_gb} must be positive, e.g. 80.")
    for flag, value in (
        ("--num_gpus_per_node", planner.num_gpus_per_node),
        ("--num_nodes", planner.num_nodes),
    ):
        if value < 1:
            problems.append(f"{flag} {value} must be at least 1.")
    return problems


def _dtype_problems(dtype: str, on_cuda: bool, bf16_supported: bool) -> list[str]:
    if dtype == "fp16" and not on_cuda:
        return ["--dtype fp16 needs a GPU (CPUs have no fp16 training path); use bf16 or fp32."]
    if dtype == "bf16" and on_cuda and not bf16_supported:
        return [
            "--dtype bf16 is only emulated on this GPU (compute capability below 8.0); use fp16."
        ]
    return []


def _output_dir_problems(output_dir: str | None) -> list[str]:
    if not output_dir:
        return [
            "--output_dir is required to train (where the model is saved), e.g. --output_dir ./output."
        ]
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        return [f"--output_dir {output_dir!r} is a file, not a folder; choose another path."]
    # Nothing is created here: validation must leave no trace when it fails.
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        return [
            f"--output_dir {output_dir!r} cannot be created or written ({existing!r} is not a "
            "writable folder); choose another path."
        ]
    return []


def _model_problems(model: ModelConfig, max_seq_len: int, packing: bool) -> list[str]:
    try:
        config = load_model_config(model)
    except UserError as err:
        return [str(err)]
    problems = []
    if packing:
        attn = getattr(config, "_attn_implementation", None)
        problems += packing_problems(config.model_type, attn)
    limit = max_positions(config)
    if limit is not None and max_seq_len > limit:
        problems += [
            f"--max_seq_len {max_seq_len} is longer than the model's {limit} positions; "
            f"use --max_seq_len {limit} or less."
        ]
    return problems
