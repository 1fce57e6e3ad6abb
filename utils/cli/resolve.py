"""The pieces of a run's setup that validation resolves (utils/cli/validate.py), each with
the problems that keep it from being resolved: the merged DeepSpeed config, the model's
files (config, weights, tokenizer, chat template: each loaded once) and the loss path."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from utils.config import Config
from utils.data.chat import ChatTemplate, load_chat_template
from utils.engine.ds_config import EngineSetup, build_ds_config, setup_problems
from utils.engine.precision import detect_dtype
from utils.engine.precision_rules import precision_problems
from utils.errors import UserError
from utils.model.chunked_loss import chunked_loss_config_problem, chunked_loss_problem
from utils.model.folder_checks import tokenizer_problems, unloadable_tokenizer, weight_problems
from utils.model.load import (
    load_model_config,
    load_tokenizer,
    max_positions,
    meta_model,
    padded_vocab_size,
)
from utils.model.lora import adapts_output_layer
from utils.model.loss import LossPath, decide_loss_path


@dataclass(frozen=True)
class ModelFiles:
    """What the model folder provides, as loaded (None where it could not be, or was not)."""

    config: PretrainedConfig | None
    tokenizer: PreTrainedTokenizerBase | None
    template: ChatTemplate | None


def resolve_engine(
    cfg: Config, world_size: int, on_cuda: bool, bf16_supported: bool
) -> tuple[EngineSetup | None, list[str]]:
    """The merged DeepSpeed config (the flags', a --deepspeed_config over it), or None and
    what in it cannot train here. The caller checks the flags it is built from first."""
    dtype, reason = detect_dtype(cfg.engine.dtype)
    try:
        config = build_ds_config(
            cfg.engine, cfg.train, cfg.observe, world_size, dtype, on_cuda=on_cuda
        )
    except UserError as err:  # a --deepspeed_config that cannot be read
        return None, [str(err)]
    setup = EngineSetup(config=config, dtype_reason=reason)
    problems = setup_problems(setup, cfg.train, world_size, cfg.engine.deepspeed_config, on_cuda)
    if not problems:  # on the merged config: a --deepspeed_config's stage counts
        problems = precision_problems(
            setup.dtype, setup.zero_stage, on_cuda, bf16_supported, setup.offload, cfg.engine.dtype
        )
    return (None if problems else setup), problems


def load_model_files(cfg: Config, read_files: bool) -> tuple[ModelFiles, list[str]]:
    """The model's config, and with `read_files` its weights checked, its tokenizer and the
    chat template; the problems with each. The memory planner reads only the config, so a
    config-only folder is enough for it."""
    try:
        config = load_model_config(cfg.model)
    except UserError as err:
        return ModelFiles(None, None, None), [str(err)]
    problems = []
    limit = max_positions(config)
    if limit is not None and cfg.data.max_seq_len > limit:
        problems.append(
            f"--max_seq_len {cfg.data.max_seq_len} is longer than the model's {limit} "
            f"positions; use --max_seq_len {limit} or less."
        )
    if not read_files:
        return ModelFiles(config, None, None), problems
    problems += weight_problems(cfg.model.model_name_or_path)
    try:
        tokenizer = load_tokenizer(cfg.model, cfg.data.added_token)
    except (OSError, ValueError, TypeError) as err:
        return ModelFiles(config, None, None), [*problems, unloadable_tokenizer(cfg.model, err)]
    if more := tokenizer_problems(cfg.model, config, tokenizer):
        return ModelFiles(config, None, None), problems + more
    try:  # checked with the tokenizer it renders with
        template = load_chat_template(cfg.data.chat_template, tokenizer)
    except UserError as err:
        return ModelFiles(config, tokenizer, None), [*problems, str(err)]
    return ModelFiles(config, tokenizer, template), problems


def resolve_loss(
    cfg: Config, files: ModelFiles, engine: EngineSetup, device_type: str
) -> tuple[LossPath | None, list[str]]:
    """The run's loss by the one rule (utils/model/loss.py), decided before the model loads,
    or None and why --chunked_loss on cannot hold."""
    config, model = files.config, cfg.model
    # The output layer's rows: the tokenizer's padded vocabulary once the embeddings are
    # resized to it (the config's where no tokenizer is read: --estimate_memory).
    vocab = padded_vocab_size(files.tokenizer) if files.tokenizer else config.vocab_size
    # Where the flags alone decide (off, or --compile), no model is built to ask.
    asks_model = model.chunked_loss != "off" and not model.compile
    try:
        loss = decide_loss_path(
            model.chunked_loss,
            _chunked_loss_problem(cfg, config) if asks_model else None,
            zero_stage=engine.zero_stage,
            device_type=device_type,
            fp32=model.compute_fp32_loss,
            compiled=model.compile,
            vocab=vocab,
        )
    except UserError as err:
        return None, [str(err)]
    return loss, []


def _chunked_loss_problem(cfg: Config, config: PretrainedConfig) -> str | None:
    """Why the chunked loss would differ from this model's plain loss: its config, then a
    one-layer copy on the meta device (its output layer, and whether LoRA would wrap it)."""
    if problem := chunked_loss_config_problem(config):
        return problem
    model = meta_model(config, 1, cfg.model.trust_remote_code)
    if adapts_output_layer(model, cfg.lora):
        return f"--lora_module_name {cfg.lora.lora_module_name!r} puts LoRA on the output layer"
    return chunked_loss_problem(model)
