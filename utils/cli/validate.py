"""Check every flag once, before any expensive work, and report all problems together.

`validate` is the one validation step of main.py: the flags, the model folder, the data
flags, the checkpoint flags and the merged DeepSpeed config. What it resolves on the way
(utils/cli/resolve.py) it returns as the RunSetup every later step reads.
"""

from __future__ import annotations

import math
import os
import tempfile
import types
import typing
from dataclasses import fields

import torch

from utils.checkpoint.checkpointer import checkpoint_problems
from utils.cli.resolve import load_model_files, resolve_engine, resolve_loss
from utils.config import Config
from utils.data.build import check_data_config
from utils.data.loaders import LoaderWorkers, choose_loader_workers
from utils.data.packing import pack_layout, packing_problems
from utils.distributed import DistInfo
from utils.engine.ds_config import EngineSetup
from utils.engine.precision import NATIVE_BF16_CAPABILITY
from utils.errors import ConfigError, format_problems
from utils.model.attention import (
    attention_dtype_problems,
    flash_attention_problems,
    flash_attn_error,
    flex_attention_problems,
    resolve_attention,
)
from utils.planner.config import PlannerConfig
from utils.run_setup import RunSetup

# Float flags for which 0 is a meaningful setting ("no weight decay", "no dropout").
ZERO_ALLOWED = {"weight_decay", "dropout"}


def validate(cfg: Config, dist: DistInfo) -> RunSetup:
    """Every problem with the flags and the files they name, at once (ConfigError, exit 2);
    else what start-up decided. Each piece is resolved where what it is made from is valid,
    so one bad flag hides no other problem."""
    on_cuda = dist.device.type == "cuda"
    # Native bf16 only: torch.cuda.is_bf16_supported() also counts V100/T4's slow emulation.
    bf16 = on_cuda and torch.cuda.get_device_capability(dist.device) >= NATIVE_BF16_CAPABILITY
    problems = flag_problems(cfg, on_cuda, bf16)
    engine = None
    if not engine_flag_problems(cfg, on_cuda, bf16):  # those are among the flags' problems
        engine, more = resolve_engine(cfg, dist.world_size, on_cuda, bf16)
        problems += more
    files, more = load_model_files(cfg, read_files=not cfg.planner.estimate_memory)
    problems += more
    if engine is not None and files.config is not None:
        attention, attention_reason, more = _resolve_attention(cfg, engine, files.config, on_cuda)
        loss, more_loss = resolve_loss(cfg, files, engine, dist.device.type)
        problems += more + more_loss
    if problems:
        raise ConfigError(format_problems(problems))
    # No problem: every piece above was resolved.
    layout = pack_layout(attention)
    return RunSetup(
        engine=engine,
        attention=attention,
        attention_reason=attention_reason,
        pack_layout=layout,
        loss=loss,
        model_config=files.config,
        tokenizer=files.tokenizer,
        template=files.template,
        world_size=dist.world_size,
        loader=_resolve_loader(cfg, layout, on_cuda),
    )


def _resolve_attention(
    cfg: Config, setup: EngineSetup, config, on_cuda: bool
) -> tuple[str | None, str, list[str]]:
    """The attention implementation the run will use (it depends on the precision the merged
    config trains in and on the model's `config`), why, and why that one cannot run, if so."""
    attention, why = resolve_attention(
        cfg.model.attn_implementation,
        model_type=config.model_type,
        packing=cfg.batch.packing,
        on_cuda=on_cuda,
        dtype=setup.dtype,
        attention_dropout=getattr(config, "attention_dropout", 0.0),
        flash_error=flash_attn_error(),
    )
    problems = attention_dtype_problems(attention, setup.dtype)
    problems += flex_attention_problems(attention, on_cuda=on_cuda, config=config)
    if cfg.batch.packing:
        problems += packing_problems(config.model_type, attention)
    return attention, why, problems


def _resolve_loader(cfg: Config, layout: str, on_cuda: bool) -> LoaderWorkers:
    """Who collates the training batches: packs that carry an attention mask (`layout`, from
    the attention the run resolved) are the costly ones."""
    masked_packs = cfg.batch.packing and layout == "mask"
    return choose_loader_workers(
        cfg.batch.dataloader_num_workers, on_cuda=on_cuda, masked_packs=masked_packs
    )


def flag_problems(cfg: Config, on_cuda: bool, bf16_supported: bool) -> list[str]:
    """All problems with the flags, each naming the flag, the value and the fix."""
    problems = engine_flag_problems(cfg, on_cuda, bf16_supported)
    t, lo = cfg.train, cfg.lora
    for flag, value in (
        ("--per_device_eval_batch_size", t.per_device_eval_batch_size),
        ("--num_train_epochs", t.num_train_epochs),
    ):
        if value < 1:
            problems.append(f"{flag} {value} must be at least 1.")
    if t.max_steps is not None and t.max_steps < 1:
        problems.append(f"--max_steps {t.max_steps} must be at least 1 (or left out).")
    if t.num_warmup_steps < 0:
        problems.append(f"--num_warmup_steps {t.num_warmup_steps} must be 0 or more.")
    problems += float_problems(cfg)
    if (dropout := cfg.model.dropout) is not None and math.isfinite(dropout) and dropout >= 1:
        problems.append(f"--dropout {cfg.model.dropout} must be below 1, e.g. 0.1.")
    if lo.lora_dim < 0:
        problems.append(f"--lora_dim {lo.lora_dim} must be 0 (off) or a positive rank.")
    if lo.only_optimize_lora and not lo.enabled:
        problems.append("--only_optimize_lora needs LoRA: add --lora_dim 128 (or another rank).")
    if lo.save_lora_adapter and not lo.enabled:
        problems.append("--save_lora_adapter needs LoRA: add --lora_dim 128 (or another rank).")
    problems += _planner_problems(cfg.planner)
    problems += check_data_config(cfg.data)
    problems += flash_attention_problems(
        cfg.model.attn_implementation, on_cuda=on_cuda, flash_error=flash_attn_error()
    )
    if not (t.dry_run or cfg.planner.estimate_memory):
        problems += _output_dir_problems(t.output_dir)
        if cfg.observe.enable_tensorboard:
            problems += folder_problems("--tensorboard_path", cfg.observe.tensorboard_path)
    if not cfg.planner.estimate_memory:
        problems += folder_problems("--data_output_path", cfg.data.data_output_path)
    problems += checkpoint_problems(cfg.checkpoint)
    if cfg.batch.packing and cfg.batch.pad_to_max_len:
        problems.append("--packing and --pad_to_max_len exclude each other; choose one.")
    if (workers := cfg.batch.dataloader_num_workers) is not None and workers < 0:
        problems.append(f"--dataloader_num_workers {workers} must be 0 or more (or left out).")
    return problems


def engine_flag_problems(cfg: Config, on_cuda: bool, bf16_supported: bool) -> list[str]:
    """Problems with the flags the DeepSpeed config is built from (it is built only without)."""
    t, e = cfg.train, cfg.engine
    problems = []
    if e.zero_stage not in (0, 1, 2, 3):
        problems.append(f"--zero_stage {e.zero_stage} does not exist; use 0, 1, 2 or 3.")
    for flag, value in (
        ("--per_device_train_batch_size", t.per_device_train_batch_size),
        ("--gradient_accumulation_steps", t.gradient_accumulation_steps),
    ):
        if value < 1:
            problems.append(f"{flag} {value} must be at least 1.")
    problems += _dtype_problems(e.dtype, on_cuda, bf16_supported)
    if e.deepspeed_config and not os.path.isfile(e.deepspeed_config):
        problems.append(f"--deepspeed_config {e.deepspeed_config!r} does not exist.")
    return problems


def float_problems(cfg: Config) -> list[str]:
    """One rule for every float flag, found from the fields' types so no flag is forgotten:
    a finite number (argparse's float() also accepts nan and inf, however the flag is
    written), never negative (no float flag has a meaning below 0), and above 0 unless 0
    means "off" (ZERO_ALLOWED). One message per flag."""
    problems = []
    for group in fields(cfg):
        settings = getattr(cfg, group.name)
        hints = typing.get_type_hints(type(settings))
        for f in fields(settings):
            value = getattr(settings, f.name)
            if float not in _types(hints[f.name]) or value is None:
                continue
            zero_ok = f.name in ZERO_ALLOWED
            example = f" (default {f.default})" if isinstance(f.default, float) else ""
            if not math.isfinite(value):
                problems.append(f"--{f.name} {value} is not a finite number{example}.")
            elif value < 0 or (value == 0 and not zero_ok):
                floor = "0 or more" if zero_ok else "above 0"
                problems.append(f"--{f.name} {value} must be {floor}{example}.")
    return problems


def _types(hint: object) -> tuple:
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def _planner_problems(planner: PlannerConfig) -> list[str]:
    problems = []
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
    return folder_problems("--output_dir", output_dir)


def folder_problems(flag: str, path: str) -> list[str]:
    """Problems with a folder this run will create or write into, found now rather than
    after hours of work. Asking os.access is not enough (root passes it everywhere, and
    /proc or a read-only mount refuse anyway), so a probe folder is made in the nearest
    existing ancestor and removed at once: validation leaves no trace."""
    if os.path.exists(path) and not os.path.isdir(path):
        return [f"{flag} {path!r} is a file, not a folder; choose another path."]
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sft-write-probe-", dir=existing))
    except OSError as err:
        return [
            f"{flag} {path!r} cannot be created or written: making a folder in {existing!r} "
            f"fails ({err.strerror}). Choose a folder this user can write."
        ]
    return []
