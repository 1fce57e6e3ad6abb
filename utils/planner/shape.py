"""A model's shape for the memory planner, from its config alone.

Parameters are counted on a 1- and a 2-layer copy built on the meta device (no weights
allocated) and extrapolated to the real depth, so any transformers causal LM with uniform
layers works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from utils.model.config import LoraConfig
from utils.model.load import meta_model
from utils.model.lora import resolve_lora_targets

FFN_KEYS = ("intermediate_size", "ffn_dim", "n_inner")


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts and the dimensions activations depend on."""

    total_params: int  # tied weights counted once
    largest_layer_params: int  # biggest single module, what ZeRO-3 gathers at once
    lora_params: int
    lora_linears_per_layer: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    gated_mlp: bool


def _ffn_size(config: PretrainedConfig) -> int:
    for key in FFN_KEYS:
        if getattr(config, key, None):
            return getattr(config, key)
    return 4 * config.hidden_size  # GPT-2 leaves n_inner unset meaning 4 * hidden


def _count(model: torch.nn.Module, lora: LoraConfig) -> tuple[int, int, int, int]:
    unique = {id(p): p.numel() for p in model.parameters()}
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    lora_params = targets = 0
    if lora.enabled:
        names = resolve_lora_targets(model, lora.lora_module_name)
        targets = len(names)
        for name in names:
            weight = model.get_submodule(name).weight  # (out, in); transposed for GPT-2's Conv1D
            lora_params += lora.lora_dim * sum(weight.shape)
    return sum(unique.values()), largest, lora_params, targets


def measure_shape(
    config: PretrainedConfig, lora: LoraConfig, trust_remote_code: bool = False
) -> ModelShape:
    """Counts for the full depth from a 1- and a 2-layer meta model (layers are uniform)."""
    one_layer = meta_model(config, 1, trust_remote_code)
    one = _count(one_layer, lora)
    two = _count(meta_model(config, 2, trust_remote_code), lora)
    layers = config.num_hidden_layers
    per_layer = [b - a for a, b in zip(one, two, strict=True)]
    total, _, lora_params, _ = (a + (layers - 1) * d for a, d in zip(one, per_layer, strict=True))
    return ModelShape(
        total_params=total,
        largest_layer_params=max(one[1], two[1]),
        lora_params=lora_params,
        lora_linears_per_layer=per_layer[3],
        hidden=config.hidden_size,
        layers=layers,
        heads=config.num_attention_heads,
        ffn=_ffn_size(config),
        vocab=config.vocab_size,
        gated_mlp=any(n.endswith("gate_proj") for n, _ in one_layer.named_modules()),
    )
