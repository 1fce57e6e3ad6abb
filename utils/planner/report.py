"""`--estimate_memory`: the planner's figures for a run as a table and a JSON line.

Reads the model's config only (no weights, no data); see utils/planner/estimate.py
for how each figure is estimated and where DeepSpeed's estimators are used, and
utils/cli/memory_plan.py for what of the run it plans.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from transformers import PretrainedConfig

from utils.planner.estimate import GB, PlanInputs, plan_memory
from utils.planner.largest import largest_fitting_model
from utils.planner.shape import measure_shape

RULE_OF_THUMB_GB_PER_BILLION = 3  # README: GPU GB / 3 = billions of params (ZeRO-3+GC+LoRA)


def estimate_memory(inputs: PlanInputs, config: PretrainedConfig) -> dict:
    """The planner's figures for a run of the model `config` describes, as the JSON summary
    line reports them."""
    plan = plan_memory(measure_shape(config, inputs.lora, inputs.trust_remote_code), inputs)
    largest = largest_fitting_model(config, inputs)
    largest_params = largest[0].params if largest else 0
    rule = inputs.planner.gpu_memory_gb / RULE_OF_THUMB_GB_PER_BILLION * 1e9
    return {
        "model_params": plan.shape.total_params,
        "lora_params": plan.shape.lora_params,
        "params_gb_per_gpu": plan.states.params / GB,
        "grads_gb_per_gpu": plan.states.grads / GB,
        "optimizer_gb_per_gpu": plan.states.optimizer / GB,
        "model_states_gb_per_gpu": plan.states.total / GB,
        "activations_gb_per_gpu": plan.activations / GB,
        "total_gb_per_gpu": plan.total_per_gpu / GB,
        "total_gpu_gb_per_node": plan.total_per_gpu * inputs.planner.num_gpus_per_node / GB,
        "cpu_gb_per_node": plan.states.cpu_per_node / GB,
        "model_states_source": plan.states.source,
        "gpu_memory_gb": inputs.planner.gpu_memory_gb,
        "fits": plan.total_per_gpu <= inputs.planner.gpu_memory_gb * GB,
        "largest_model_params": largest_params,
        "largest_model_shape": _shape_summary(largest[1]) if largest else None,
        "largest_model_cpu_gb_per_node": largest[0].states.cpu_per_node / GB if largest else 0,
        "rule_of_thumb_params": int(rule),
        "rule_of_thumb_holds": largest_params >= rule,
        "shape": asdict(plan.shape),
        "loss_mode": inputs.loss_mode,
    }


def _shape_summary(config: PretrainedConfig) -> dict:
    return {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
    }


def format_memory_plan(summary: dict, inputs: PlanInputs) -> str:
    """A per-GPU / per-node table; the last line is the JSON summary."""
    planner, engine, lora = inputs.planner, inputs.engine, inputs.lora
    gpus = planner.num_gpus_per_node
    lora_text = f"LoRA r={lora.lora_dim}" + (
        " (only LoRA trains)" if lora.only_optimize_lora else ""
    )
    rows = [
        ("parameters", summary["params_gb_per_gpu"]),
        ("gradients", summary["grads_gb_per_gpu"]),
        ("optimizer states", summary["optimizer_gb_per_gpu"]),
        ("activations", summary["activations_gb_per_gpu"]),
        ("total GPU", summary["total_gb_per_gpu"]),
    ]
    lines = [
        f"Memory plan for {summary['model_params'] / 1e9:.3f}B parameters"
        + (f" + {summary['lora_params'] / 1e6:.2f}M LoRA" if lora.enabled else ""),
        f"  ZeRO-{engine.zero_stage}, offload {'on' if engine.offload else 'off'}, dtype "
        f"{engine.dtype}, gradient checkpointing {'on' if inputs.checkpointing else 'off'}, "
        f"{lora_text if lora.enabled else 'no LoRA'}, loss {summary['loss_mode']}, micro-batch "
        f"{inputs.micro_batch} x {inputs.seq_len} tokens, "
        f"{planner.num_nodes} node(s) x {gpus} GPU(s)",
        f"  {'':<18}{'per GPU':>12}{'per node':>12}",
    ]
    lines += [f"  {name:<18}{gb:>10.2f}GB{gb * gpus:>10.2f}GB" for name, gb in rows]
    lines += [
        f"  {'host (CPU) memory':<18}{'':>12}{summary['cpu_gb_per_node']:>10.2f}GB",
        f"  model states: {summary['model_states_source']}; activations: our estimate "
        "(DeepSpeed has none). Not counted: CUDA context, allocator fragmentation, "
        "communication buckets (~1-3 GB).",
        f"  fits {planner.gpu_memory_gb:g} GB per GPU: {'yes' if summary['fits'] else 'NO'}; "
        f"largest model of this family and shape ratio that fits: "
        f"{summary['largest_model_params'] / 1e9:.2f}B parameters {summary['largest_model_shape']}"
        f" (host memory per node: {summary['largest_model_cpu_gb_per_node']:.0f} GB)",
        f"  README rule of thumb ({planner.gpu_memory_gb:g} GB / "
        f"{RULE_OF_THUMB_GB_PER_BILLION} = {summary['rule_of_thumb_params'] / 1e9:.1f}B params, "
        f"meant for ZeRO-3 + gradient checkpointing + LoRA): "
        f"{'holds' if summary['rule_of_thumb_holds'] else 'does not hold'} for these settings",
        json.dumps(summary, sort_keys=True),
    ]
    return "\n".join(lines)
