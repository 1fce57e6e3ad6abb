"""Tokenizer and model loading.

A local folder is authoritative: its own tokenizer and config are used, never a
re-download by a name found inside it, and no model family is guessed from the
path string. Remote code runs only with --trust_remote_code.
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from utils.arithmetic import round_up
from utils.data.packing import FLEX_ATTENTION
from utils.distributed import warn_rank_0
from utils.errors import UserError
from utils.model.config import ModelConfig
from utils.model.document_mask import mask_documents

# Config attributes that hold a dropout probability, across the decoder families we support.
DROPOUT_KEYS = (
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "hidden_dropout",
    "attention_probs_dropout_prob",
    "hidden_dropout_prob",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
)
POSITION_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")


def load_model_config(cfg: ModelConfig) -> PretrainedConfig:
    """The model's config, or a UserError saying why it cannot be found (checked before any big work)."""
    path = cfg.model_name_or_path
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        if os.path.isfile(path):
            raise UserError(
                f"--model_name_or_path {path!r} is a file; pass the folder that holds it "
                f"({os.path.dirname(path) or '.'!r}) with its config.json and tokenizer."
            ) from err
        if os.path.isdir(path):
            raise UserError(
                f"--model_name_or_path {path!r} is a folder but not a model folder ({err}). "
                "Point it at a folder written by save_pretrained (it must hold config.json)."
            ) from err
        raise UserError(
            f"--model_name_or_path {path!r} is neither a local folder nor reachable on the "
            "Hugging Face hub (offline, or the name is wrong). Pass a local folder holding the "
            "model, or download it first with `huggingface-cli download` on a connected machine."
        ) from err
    if cfg.dropout is not None:
        for key in DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, cfg.dropout)
    return config


def max_positions(config: PretrainedConfig) -> int | None:
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_tokenizer(cfg: ModelConfig, eot_token: str | None) -> PreTrainedTokenizerBase:
    """The model's own tokenizer, padding on the right; `eot_token` is added as a special
    token when given (--add_eot_token)."""
    tokenizer = AutoTokenizer.from_pretrained(
        cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code
    )
    if tokenizer.pad_token is None:
        # Reusing EOS keeps the vocabulary (no untrained embedding); padding is masked
        # by position, never by comparing ids, so EOS inside the text is still learned.
        warn_rank_0(
            f"the tokenizer of {cfg.tokenizer_path} has no pad token; using its EOS "
            f"token {tokenizer.eos_token!r} for padding (pad positions never enter the loss)."
        )
        tokenizer.pad_token = tokenizer.eos_token
    if eot_token is not None:
        tokenizer.add_special_tokens({"additional_special_tokens": [eot_token]})
    tokenizer.padding_side = "right"
    return tokenizer


def padded_vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    """Embedding rows for the tokenizer, rounded up to a multiple of 8 (tensor-core friendly)."""
    return round_up(len(tokenizer), 8)


def meta_model(config: PretrainedConfig, layers: int, trust_remote_code: bool) -> PreTrainedModel:
    """The model's architecture with `layers` decoder layers, on the meta device (no weights,
    no memory): its module names, output layer and parameter shapes, for what is decided
    before it loads (the loss path, the memory plan)."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers  # attribute_map routes this to n_layer for GPT-2
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def build_model(
    cfg: ModelConfig,
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    ds_config: dict | None = None,
    on_meta: bool = False,
    attention: str | None = None,
) -> PreTrainedModel:
    """The causal LM, with pad/eos ids set and embeddings resized.

    `config`: the model's config as validation loaded it (`load_model_config`: --dropout
    applied); the model gets a copy. `on_meta` builds the architecture without allocating or
    reading weights (dry runs). `attention`: the attention implementation validation
    resolved (None: transformers' default, sdpa where the model has it); under
    flex_attention a packed batch's examples are kept apart by a block mask built from its
    position ids (`mask_documents`).
    """
    config = copy.deepcopy(config)
    if on_meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, trust_remote_code=cfg.trust_remote_code, attn_implementation=attention
            )
    else:
        with _zero3_init_context(ds_config):
            model = AutoModelForCausalLM.from_pretrained(
                cfg.model_name_or_path,
                config=config,
                trust_remote_code=cfg.trust_remote_code,
                dtype=torch.float32,  # DeepSpeed casts to fp16/bf16 and keeps fp32 master weights
                attn_implementation=attention,
            )
            _resize_embeddings(model, tokenizer)
    if on_meta:
        _resize_embeddings(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.use_cache = False
    if attention == FLEX_ATTENTION:
        mask_documents(model)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing keeps gradients flowing to adapters even when
        # every base weight (and so every checkpointed input) is frozen.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:  # transformers < 5
            model.gradient_checkpointing_enable({"use_reentrant": False})
    return model


def _resize_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    # num_embeddings, not weight.shape: at ZeRO-3 the weight is an empty shard.
    if model.get_input_embeddings().num_embeddings != padded_vocab_size(tokenizer):
        model.resize_token_embeddings(padded_vocab_size(tokenizer))


@contextlib.contextmanager
def _zero3_init_context(ds_config: dict | None):
    """At ZeRO-3, from_pretrained must see the DeepSpeed config while it builds the model,
    so every rank loads only its own shard instead of the full weights (and resizing must
    gather them). transformers looks for a live HfDeepSpeedConfig object; it has no other
    purpose, hence the bare reference kept alive for the block."""
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del keep_alive


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable), counting ZeRO-3 partitioned parameters at their full size."""
    total = trainable = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable
