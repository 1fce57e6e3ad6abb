"""Memory planner for `--estimate_memory`: what a run needs per GPU and per node.

Computed from the model's config alone (its shape: utils/planner/shape.py).

Model states (parameters, gradients, optimizer states) come from DeepSpeed's own
estimators (`estimate_zero2/3_model_states_mem_needs`) for the case they cover:
mixed-precision Adam at ZeRO-2/3. We extend them (and say so in the output) for
ZeRO-0/1, fp32 training, frozen base weights under LoRA, and activations, which
DeepSpeed does not estimate. Sizes are in GB of 2**30 bytes, as DeepSpeed prints.
"""

from __future__ import annotations

from dataclasses import dataclass

from utils.engine.config import EngineConfig
from utils.model.config import LoraConfig
from utils.planner.config import PlannerConfig
from utils.planner.loss_memory import estimate_loss_memory
from utils.planner.shape import ModelShape

GB = 2**30
BUFFER_FACTOR = 1.5  # DeepSpeed's default `additional_buffer_factor` for host memory


@dataclass(frozen=True)
class PlanInputs:
    """What a run's memory depends on besides the model's shape (utils/cli/memory_plan.py
    fills it from the flags and the resolved setup)."""

    engine: EngineConfig  # the precision the GPUs train in; the merged config's stage, offload
    lora: LoraConfig
    planner: PlannerConfig
    micro_batch: int  # sequences per GPU (--per_device_train_batch_size)
    seq_len: int  # tokens per sequence (--max_seq_len)
    checkpointing: bool  # --gradient_checkpointing
    loss_mode: str  # "plain", or the chunked loss's "fused" or "recompute"
    trust_remote_code: bool  # the model's own code builds its shape (--trust_remote_code)


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU for each model state, and host bytes per node."""

    params: int
    grads: int
    optimizer: int
    cpu_per_node: int
    source: str  # which estimator produced the total

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def deepspeed_model_states(
    shape: ModelShape, trainable: int, engine: EngineConfig, planner: PlannerConfig
) -> tuple[int, int] | None:
    """(gpu bytes, host bytes per node) from DeepSpeed's estimator, or None where it has none."""
    if engine.zero_stage not in (2, 3) or engine.dtype == "fp32":
        return None
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    common = {
        "num_gpus_per_node": planner.num_gpus_per_node,
        "num_nodes": planner.num_nodes,
        "cpu_offload": engine.offload,
        "additional_buffer_factor": BUFFER_FACTOR,
    }
    if engine.zero_stage == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(total_params=trainable, **common)
        return gpu, cpu
    # DeepSpeed-Chat's --offload at ZeRO-3 offloads parameters too; the model is
    # built under zero.Init (HfDeepSpeedConfig), hence zero_init=True.
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        total_params=trainable,
        largest_layer_params=shape.largest_layer_params,
        cpu_offload_params=engine.offload,
        zero_init=True,
        **common,
    )
    return gpu, cpu


def estimate_model_states(
    shape: ModelShape, lora: LoraConfig, engine: EngineConfig, planner: PlannerConfig
) -> ModelStates:
    """Per-GPU parameters, gradients and optimizer states (Adam) at the run's ZeRO stage.

    Bytes per trainable parameter, mixed precision (DeepSpeed's accounting): 16-bit
    weights 2; gradients 6 (16-bit + fp32) or 4 at ZeRO-3 (fp32 partition only);
    optimizer 12 (fp32 master + momentum + variance). fp32 training: 4, 4, 8.
    ZeRO-1 partitions the optimizer, ZeRO-2 also gradients, ZeRO-3 also weights
    (plus the largest layer gathered, 4 bytes/param). Frozen base weights under
    --only_optimize_lora carry only their 16-bit copy. --offload moves the
    optimizer (and at ZeRO-3 the weights) to host memory.
    """
    n, stage, offload = planner.world_size, engine.zero_stage, engine.offload
    base = shape.total_params + shape.lora_params
    trainable = shape.lora_params if lora.enabled and lora.only_optimize_lora else base
    frozen = base - trainable
    wide = engine.dtype == "fp32"
    w_bytes, g_bytes, o_bytes = (4, 4, 8) if wide else (2, 4 if stage == 3 else 6, 12)

    params = (w_bytes * base) // (n if stage == 3 else 1)
    if stage == 3:
        params = 0 if offload else params
        params += 2 * w_bytes * shape.largest_layer_params
    grads = g_bytes * trainable // (n if stage >= 2 else 1)
    optimizer = o_bytes * trainable // (n if stage >= 1 else 1)
    if offload:
        # fp32 gradients and the optimizer step live on the host; 16-bit grads stay for ZeRO-0/1.
        grads = 2 * trainable if stage < 2 and not wide else 0
        optimizer = 0
    # Host memory: DeepSpeed's figure (loading buffer, offloaded states) for all parameters.
    host_states = (w_bytes + g_bytes + o_bytes) * base // planner.num_nodes if offload else 0
    cpu = int(max(4 * base * planner.num_gpus_per_node, host_states) * BUFFER_FACTOR)
    source = "extension (DeepSpeed has no estimator for this stage/dtype)"

    ds = deepspeed_model_states(shape, trainable, engine, planner)
    if ds is not None:
        _, cpu = deepspeed_model_states(shape, base, engine, planner)  # host: all weights load
        source = f"DeepSpeed estimate_zero{stage}_model_states_mem_needs"
        frozen_bytes = 2 * frozen // (n if stage == 3 else 1)
        frozen_bytes = 0 if stage == 3 and offload else frozen_bytes
        # Keep our split but take DeepSpeed's total (tests check the two agree).
        params = ds[0] + frozen_bytes - grads - optimizer
    return ModelStates(params, grads, optimizer, cpu, source)


def estimate_activations(
    shape: ModelShape,
    batch: int,
    seq: int,
    checkpointing: bool,
    lora: LoraConfig,
    dtype: str,
    *,
    loss_mode: str,
    gpu_memory: int,
) -> int:
    """Bytes of activations kept for the backward pass on one GPU of `gpu_memory` bytes.

    Per layer, after Korthikanti et al. 2022 ("Reducing Activation Recomputation in
    Large Transformer Models", eq. 1, no tensor parallelism), with SDPA/flash attention
    so the seq x seq score matrix is not stored: attention 11*s*b*h, layer norms
    4*s*b*h, MLP 3*s*b*h + 4*s*b*ffn (6*s*b*ffn for a gated MLP as in LLaMA), i.e.
    34*s*b*h for OPT/GPT-2 shapes. Gradient checkpointing keeps each layer's 16-bit
    input (2*s*b*h) plus one layer recomputed at a time. The loss: `estimate_loss_memory`
    (`loss_mode` "plain", or the chunked loss's "fused"/"recompute").
    Our extension for LoRA: each adapted linear stores its rank-r intermediate.
    """
    tokens = batch * seq
    scale = 2 if dtype == "fp32" else 1  # the formula counts 16-bit elements
    mlp = (6 if shape.gated_mlp else 4) * shape.ffn
    layer = tokens * (18 * shape.hidden + mlp) * scale
    if lora.enabled:
        layer += shape.lora_linears_per_layer * tokens * lora.lora_dim * 2 * scale
    kept = (
        shape.layers * tokens * 2 * shape.hidden * scale + layer
        if checkpointing
        else shape.layers * layer
    )
    return kept + estimate_loss_memory(shape, tokens, dtype, loss_mode, gpu_memory)


@dataclass(frozen=True)
class MemoryPlan:
    shape: ModelShape
    states: ModelStates
    activations: int

    @property
    def params(self) -> int:
        return self.shape.total_params + self.shape.lora_params

    @property
    def total_per_gpu(self) -> int:
        return self.states.total + self.activations


def plan_memory(shape: ModelShape, inputs: PlanInputs) -> MemoryPlan:
    states = estimate_model_states(shape, inputs.lora, inputs.engine, inputs.planner)
    activations = estimate_activations(
        shape,
        inputs.micro_batch,
        inputs.seq_len,
        inputs.checkpointing,
        inputs.lora,
        inputs.engine.dtype,
        loss_mode=inputs.loss_mode,
        gpu_memory=int(inputs.planner.gpu_memory_gb * GB),
    )
    return MemoryPlan(shape, states, activations)
