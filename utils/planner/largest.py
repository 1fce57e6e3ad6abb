"""The largest model of a family that fits --gpu_memory_gb: the same shape ratios scaled
by attention heads, searched with the memory plan (`--estimate_memory`'s last line)."""

from __future__ import annotations

import copy

from transformers import PretrainedConfig

from utils.planner.estimate import GB, MemoryPlan, PlanInputs, plan_memory
from utils.planner.shape import FFN_KEYS, measure_shape

MAX_HEADS = 1 << 12


def scale_config(config: PretrainedConfig, heads: int) -> PretrainedConfig:
    """The same family and shape ratio with `heads` attention heads: width and depth
    grow together (head size, vocabulary and grouped-query ratio kept)."""
    factor = heads / config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    scaled = copy.deepcopy(config)
    scaled.num_attention_heads = heads
    scaled.hidden_size = heads * head_dim
    scaled.num_hidden_layers = max(1, round(config.num_hidden_layers * factor))
    for key in FFN_KEYS:
        if getattr(config, key, None):
            setattr(scaled, key, max(1, round(getattr(config, key) * factor)))
    if getattr(config, "word_embed_proj_dim", None):  # OPT's embedding projection width
        scaled.word_embed_proj_dim = max(1, round(config.word_embed_proj_dim * factor))
    kv = getattr(config, "num_key_value_heads", None)
    if kv:
        group = max(1, config.num_attention_heads // kv)
        scaled.num_key_value_heads = max(1, heads // group)
        scaled.num_attention_heads = scaled.num_key_value_heads * group
        scaled.hidden_size = scaled.num_attention_heads * head_dim
    return scaled


def largest_fitting_model(
    config: PretrainedConfig, inputs: PlanInputs
) -> tuple[MemoryPlan, PretrainedConfig] | None:
    """Plan and config of the largest scaled model within --gpu_memory_gb per GPU.

    Only GPU memory bounds the search: with --offload check the host memory it
    reports. Searching stops at MAX_HEADS attention heads.
    """
    budget = inputs.planner.gpu_memory_gb * GB

    def plan(heads: int) -> tuple[MemoryPlan, PretrainedConfig]:
        scaled = scale_config(config, heads)
        return plan_memory(
            measure_shape(scaled, inputs.lora, inputs.trust_remote_code), inputs
        ), scaled

    def fits(heads: int) -> bool:
        return plan(heads)[0].total_per_gpu <= budget

    if not fits(1):
        return None
    low, high = 1, 2
    while high < MAX_HEADS and fits(high):  # grow until it no longer fits
        low, high = high, high * 2
    while high - low > 1:  # invariant: low fits, high does not (or is the cap)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return plan(high if high == MAX_HEADS and fits(high) else low)
