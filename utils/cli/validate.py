"""Check every flag once, before any expensive work, and report all problems together.

`validate` is the one validation step of main.py: the flags, the model folder, the data
flags, the checkpoint flags and the merged DeepSpeed config. It returns the EngineSetup
every later step reads the effective ZeRO stage and precision from.
"""

from __future__ import annotations

import math
import os
import tempfile
import types
import typing
from dataclasses import fields, replace

import torch

from utils.config import Config
from utils.data.build import check_data_config
from utils.data.chat import load_chat_template
from utils.data.config import DSCHAT, DataConfig
from utils.data.loaders import choose_loader_workers
from utils.data.packing import packing_problems
from utils.engine.checkpoint import checkpoint_problems
from utils.engine.ds_config import EngineSetup, build_ds_config, setup_problems
from utils.engine.precision import NATIVE_BF16_CAPABILITY, detect_dtype
from utils.engine.precision_rules import precision_problems
from utils.errors import ConfigError, UserError, format_problems
from utils.model.attention import (
    attention_dtype_problems,
    flash_attention_problems,
    flash_attn_installed,
    resolve_attention,
    uses_flat_packs,
)
from utils.model.chunked_loss import chunked_loss_config_problem
from utils.model.config import ModelConfig
from utils.model.folder_checks import tokenizer_problems, weight_problems
from utils.model.load import load_model_config, max_positions
from utils.planner.config import PlannerConfig

# Float flags for which 0 is a meaningful setting ("no weight decay", "no dropout").
ZERO_ALLOWED = {"weight_decay", "dropout"}


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
            config = build_ds_config(
                cfg.engine, cfg.train, cfg.observe, world_size, dtype, on_cuda=on_cuda
            )
            setup = EngineSetup(config=config, world_size=world_size, dtype_reason=reason)
            problems += setup_problems(setup, cfg.train, cfg.engine.deepspeed_config, on_cuda)
            if not problems:  # on the merged config: a --deepspeed_config's stage counts
                problems += precision_problems(
                    setup.dtype, setup.zero_stage, on_cuda, bf16, setup.offload, cfg.engine.dtype
                )
            setup, more = _resolve_attention(cfg, setup, on_cuda)
            problems += more
            setup = _resolve_loader(cfg, setup, on_cuda)
        except UserError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError(format_problems(problems))
    return setup


def _resolve_attention(
    cfg: Config, setup: EngineSetup, on_cuda: bool
) -> tuple[EngineSetup, list[str]]:
    """The setup with the attention implementation the run will use (it depends on the
    precision the merged config trains in), and why that one cannot run, if so."""
    model_type = load_model_config(cfg.model).model_type
    flash = flash_attn_installed()
    attention, why = resolve_attention(
        cfg.model.attn_implementation,
        model_type=model_type,
        packing=cfg.batch.packing,
        on_cuda=on_cuda,
        dtype=setup.dtype,
        flash_installed=flash,
    )
    problems = attention_dtype_problems(attention, setup.dtype)
    if cfg.batch.packing:
        problems += packing_problems(model_type, attention)
    return replace(setup, attention=attention, attention_reason=why), problems


def _resolve_loader(cfg: Config, setup: EngineSetup, on_cuda: bool) -> EngineSetup:
    """The setup with who collates the training batches (packs that carry an attention
    mask, i.e. without a variable-length attention, are the costly ones)."""
    packing = cfg.batch.packing
    masked_packs = packing and not uses_flat_packs(packing, setup.attention)
    workers = choose_loader_workers(
        cfg.batch.dataloader_num_workers, on_cuda=on_cuda, masked_packs=masked_packs
    )
    return replace(setup, loader=workers)


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
    problems += _dtype_problems(e.dtype, on_cuda, bf16_supported)
    problems += flash_attention_problems(
        cfg.model.attn_implementation, on_cuda=on_cuda, flash_installed=flash_attn_installed()
    )
    if e.deepspeed_config and not os.path.isfile(e.deepspeed_config):
        problems.append(f"--deepspeed_config {e.deepspeed_config!r} does not exist.")
    if not (t.dry_run or cfg.planner.estimate_memory):
        problems += _output_dir_problems(t.output_dir)
        if cfg.observe.enable_tensorboard:
            problems += folder_problems("--tensorboard_path", cfg.observe.tensorboard_path)
    if not cfg.planner.estimate_memory:
        problems += folder_problems("--data_output_path", cfg.data.data_output_path)
    files = not cfg.planner.estimate_memory
    model_problems = _model_problems(cfg.model, cfg.data.max_seq_len, files)
    problems += model_problems
    if files and not model_problems:  # the template is checked with the tokenizer it needs
        problems += _chat_template_problems(cfg.model, cfg.data)
    problems += checkpoint_problems(cfg.checkpoint)
    if cfg.batch.packing and cfg.batch.pad_to_max_len:
        problems.append("--packing and --pad_to_max_len exclude each other; choose one.")
    if (workers := cfg.batch.dataloader_num_workers) is not None and workers < 0:
        problems.append(f"--dataloader_num_workers {workers} must be 0 or more (or left out).")
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


def _model_problems(model: ModelConfig, max_seq_len: int, files: bool) -> list[str]:
    """The model's config, and with `files` its weights and tokenizer (the memory planner
    reads only the config, so a config-only folder is enough for it). --packing is checked
    with the attention the run resolves (`_resolve_attention`)."""
    try:
        config = load_model_config(model)
    except UserError as err:
        return [str(err)]
    problems = []
    if files:
        problems += weight_problems(model.model_name_or_path)
        problems += tokenizer_problems(model, config)
    if model.chunked_loss == "on" and model.compile:
        problems.append(
            "--chunked_loss on and --compile exclude each other (the chunked loss replaces the "
            "output layer's forward on every call, which a compiled graph cannot follow); "
            "drop one (--chunked_loss auto with --compile uses the plain loss)."
        )
    if model.chunked_loss == "on" and (problem := chunked_loss_config_problem(config)):
        problems.append(
            f"--chunked_loss on cannot be used with this model: {problem}. Use --chunked_loss "
            "auto (the plain loss where the chunked one would differ)."
        )
    limit = max_positions(config)
    if limit is not None and max_seq_len > limit:
        problems += [
            f"--max_seq_len {max_seq_len} is longer than the model's {limit} positions; "
            f"use --max_seq_len {limit} or less."
        ]
    return problems


def _chat_template_problems(model: ModelConfig, data: DataConfig) -> list[str]:
    """A --chat_template that cannot be used (none in the tokenizer, a file that does not
    parse, an end-of-turn token the tokenizer splits), found before any data work."""
    if data.chat_template == DSCHAT:
        return []
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model.tokenizer_path, trust_remote_code=model.trust_remote_code
        )
        load_chat_template(data.chat_template, tokenizer)
    except UserError as err:
        return [str(err)]
    except (OSError, ValueError) as err:
        return [f"{model.tokenizer_path!r}: cannot load its tokenizer ({err})"]
    return []
