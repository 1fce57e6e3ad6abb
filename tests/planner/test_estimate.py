"""The memory planner: counts from config only, DeepSpeed's estimators, activations, largest model."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from deepspeed.runtime.zero.stage3 import (
    estimate_zero3_model_states_mem_needs,
    model_to_params,
)
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from transformers import GPT2Config, LlamaConfig, OPTConfig

from utils.cli.memory_plan import memory_plan_report, plan_inputs
from utils.cli.parse import parse_args
from utils.cli.validate import validate
from utils.distributed import DistInfo
from utils.engine.config import EngineConfig
from utils.errors import UserError
from utils.model.config import LoraConfig
from utils.model.lora import apply_lora, is_lora_parameter
from utils.planner.config import PlannerConfig
from utils.planner.estimate import GB, estimate_activations, estimate_model_states, plan_memory
from utils.planner.largest import largest_fitting_model, scale_config
from utils.planner.shape import measure_shape

CONFIGS = {
    "opt": lambda: OPTConfig(
        vocab_size=96, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=64,
    ),
    "gpt2": lambda: GPT2Config(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=64),
    "llama": lambda: LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    ),
}  # fmt: skip
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
OPT_7B = OPTConfig(
    vocab_size=50272, hidden_size=4096, word_embed_proj_dim=4096, ffn_dim=16384,
    num_hidden_layers=32, num_attention_heads=32,
)  # fmt: skip


def _real_model(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_counts_from_config_match_the_real_model(family):
    config = CONFIGS[family]()
    lora = LoraConfig(lora_dim=4)
    shape = measure_shape(config, lora)
    model = _real_model(config)
    assert (shape.total_params, shape.largest_layer_params) == model_to_params(model)
    peft_model = apply_lora(model, lora)
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if is_lora_parameter(n))
    assert shape.lora_params == lora_params > 0
    assert shape.layers == 3


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize(("gpus", "nodes"), [(1, 1), (8, 2)])
def test_full_finetune_model_states_equal_deepspeeds_estimators(stage, offload, gpus, nodes):
    shape = measure_shape(OPT_7B, LoraConfig())
    planner = PlannerConfig(num_gpus_per_node=gpus, num_nodes=nodes)
    engine = EngineConfig(zero_stage=stage, offload=offload, dtype="bf16")
    states = estimate_model_states(shape, LoraConfig(), engine, planner)
    kwargs = {"num_gpus_per_node": gpus, "num_nodes": nodes, "cpu_offload": offload}
    if stage == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(shape.total_params, **kwargs)
    else:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            shape.total_params, shape.largest_layer_params, cpu_offload_params=offload, **kwargs
        )
    assert (states.total, states.cpu_per_node) == (gpu, cpu)
    assert "DeepSpeed" in states.source


@pytest.mark.parametrize("stage", [2, 3])
def test_only_lora_adds_frozen_16bit_weights_to_deepspeeds_figure_for_the_adapters(stage):
    lora = LoraConfig(lora_dim=8, only_optimize_lora=True)
    shape = measure_shape(OPT_7B, lora)
    planner = PlannerConfig(num_gpus_per_node=4)
    states = estimate_model_states(shape, lora, EngineConfig(zero_stage=stage), planner)
    adapters = shape.lora_params
    if stage == 2:
        _, gpu = estimate_zero2_model_states_mem_needs(adapters, 4, cpu_offload=False)
        frozen = 2 * shape.total_params
    else:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            adapters, shape.largest_layer_params, 4, cpu_offload=False, cpu_offload_params=False
        )
        frozen = 2 * shape.total_params // 4
    assert states.total == pytest.approx(gpu + frozen, abs=4)
    full = estimate_model_states(
        shape, replace(lora, only_optimize_lora=False), EngineConfig(zero_stage=stage), planner
    )
    assert states.total < full.total / 3


def test_lower_stages_partition_less():
    shape = measure_shape(OPT_7B, LoraConfig())
    planner = PlannerConfig(num_gpus_per_node=8)
    totals = [
        estimate_model_states(
            shape, LoraConfig(), EngineConfig(zero_stage=s, dtype="bf16"), planner
        ).total
        for s in range(4)
    ]
    assert totals == sorted(totals, reverse=True)
    assert totals[0] == 20 * shape.total_params  # nothing partitioned: 2 + 6 + 12 bytes/param


def test_activations_follow_batch_checkpointing_and_lora():
    shape = measure_shape(OPT_7B, LoraConfig(lora_dim=16))
    no_lora, lora = LoraConfig(), LoraConfig(lora_dim=16)

    def activations(batch: int, checkpointing: bool, lora: LoraConfig) -> int:
        return estimate_activations(
            shape, batch, 512, checkpointing, lora, "bf16", loss_mode="plain", gpu_memory=80 * GB
        )

    full = activations(4, False, no_lora)
    assert activations(8, False, no_lora) == 2 * full
    checkpointed = activations(4, True, no_lora)
    assert checkpointed < full / 5
    assert activations(4, False, lora) > full
    # OPT shapes: 34*s*b*h per layer (Korthikanti et al.) plus 10 bytes per logit.
    assert full == 32 * 34 * 4 * 512 * 4096 + 4 * 512 * 50272 * 10


def planned(config, folder, *flags: str):
    """--estimate_memory's plan inputs for a config-only model folder and `flags`."""
    config.save_pretrained(folder)  # config.json only: no weights to load
    cfg = parse_args(["--model_name_or_path", str(folder), "--estimate_memory", *flags])
    return cfg, validate(cfg, CPU)


def test_largest_model_fits_and_one_size_up_does_not(tmp_path):
    cfg, setup = planned(OPT_7B, tmp_path, "--zero_stage", "3", "--gpu_memory_gb", "40",
                         "--per_device_train_batch_size", "2", "--gradient_checkpointing")  # fmt: skip
    inputs = plan_inputs(cfg, setup)
    plan, scaled = largest_fitting_model(OPT_7B, inputs)
    assert plan.total_per_gpu <= 40 * GB
    assert (
        plan_memory(measure_shape(scaled, inputs.lora), inputs).total_per_gpu == plan.total_per_gpu
    )
    bigger = scale_config(OPT_7B, scaled.num_attention_heads + 1)
    assert plan_memory(measure_shape(bigger, inputs.lora), inputs).total_per_gpu > 40 * GB
    assert scaled.hidden_size // scaled.num_attention_heads == 128  # head size kept
    more = replace(inputs, planner=replace(inputs.planner, gpu_memory_gb=80))
    assert largest_fitting_model(OPT_7B, more)[0].params > plan.params
    tiny = replace(inputs, planner=replace(inputs.planner, gpu_memory_gb=0.01))
    assert largest_fitting_model(OPT_7B, tiny) is None


def test_scaled_llama_keeps_grouped_query_ratio():
    base = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8)  # fmt: skip
    scaled = scale_config(base, 64)
    assert (scaled.num_attention_heads, scaled.num_key_value_heads) == (64, 16)
    assert (scaled.hidden_size, scaled.num_hidden_layers, scaled.intermediate_size) == (
        8192,
        64,
        22016,
    )


def test_estimate_memory_reads_only_the_config_and_ends_with_json(tmp_path, capsys):
    cfg, setup = planned(CONFIGS["opt"](), tmp_path, "--lora_dim", "4", "--only_optimize_lora",
                         "--gradient_checkpointing", "--zero_stage", "3", "--num_gpus_per_node",
                         "2", "--gpu_memory_gb", "1", "--max_seq_len", "64")  # fmt: skip
    last = json.loads(memory_plan_report(cfg, setup).splitlines()[-1])
    for key in (
        "model_states_gb_per_gpu",
        "activations_gb_per_gpu",
        "total_gb_per_gpu",
        "largest_model_params",
    ):
        assert key in last
    assert last["total_gb_per_gpu"] == pytest.approx(
        last["model_states_gb_per_gpu"] + last["activations_gb_per_gpu"]
    )
    assert last["largest_model_params"] > last["model_params"]
    assert last["rule_of_thumb_holds"] == (last["largest_model_params"] >= 1e9 / 3)


def test_unmatched_lora_scope_is_reported_by_the_planner_too():
    with pytest.raises(UserError, match="--lora_module_name"):
        measure_shape(CONFIGS["llama"](), LoraConfig(lora_dim=4, lora_module_name="nope"))


def test_missing_model_config_is_a_user_error(tmp_path):
    cfg = parse_args(["--model_name_or_path", str(tmp_path / "absent"), "--estimate_memory"])
    with pytest.raises(UserError, match="--model_name_or_path"):
        memory_plan_report(cfg, validate(cfg, CPU))
