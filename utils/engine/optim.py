"""Optimizer parameter groups, the optimizer itself and the learning-rate schedule."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from utils.engine.build_lock import check_build_lock
from utils.engine.config import TrainConfig
from utils.engine.ds_config import EngineSetup
from utils.model.config import LoraConfig
from utils.model.lora import is_lora_parameter

# Parameters whose names contain these never get weight decay (biases and norm weights).
NO_DECAY = ("bias", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_f.weight")
ADAM_BETAS = (0.9, 0.95)


def build_param_groups(model: torch.nn.Module, train: TrainConfig, lora: LoraConfig) -> list[dict]:
    """Trainable parameters in up to four groups: (decay | no decay) x (base | LoRA)."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not any(key in name.lower() for key in NO_DECAY)
        groups.setdefault((decay, is_lora_parameter(name)), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": train.weight_decay if decay else 0.0,
            "lr": lora.lora_learning_rate if is_lora else train.learning_rate,
        }
        for (decay, is_lora), params in sorted(groups.items())
    ]


def optimizer_kind(setup: EngineSetup, device_type: str) -> str:
    """Which Adam(W) trains: "torch" (torch.optim.AdamW, fused), "fused" (DeepSpeed's
    FusedAdam) or "cpu" (DeepSpeed's vectorised CPU Adam). One rule, read by the builder.

    On a GPU torch's fused AdamW: the same update as FusedAdam (tests/engine/test_optim.py),
    without FusedAdam's JIT build at start-up and its file lock. Except at ZeRO stage 0 in 16
    bits: there DeepSpeed keeps a flat fp32 master copy (FP16_Optimizer) only for FusedAdam,
    and any other optimizer gets the per-tensor wrapper (FP16_UnfusedOptimizer), which copies
    every gradient to fp32 at each step. The CPU Adam on a CPU and with --offload, where the
    optimizer states live in CPU memory.
    """
    if device_type != "cuda" or setup.offload:
        return "cpu"
    if setup.zero_stage == 0 and setup.dtype != "fp32" and not setup.autocast:
        return "fused"
    return "torch"


def build_optimizer(
    param_groups: list[dict], train: TrainConfig, setup: EngineSetup, device_type: str
) -> torch.optim.Optimizer:
    """The optimizer `optimizer_kind` picks, with the run's learning rate and ADAM_BETAS
    (AdamW: weight decay decoupled, per parameter group)."""
    kind = optimizer_kind(setup, device_type)
    if kind == "torch":
        return torch.optim.AdamW(param_groups, lr=train.learning_rate, betas=ADAM_BETAS, fused=True)
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    optimizer_class = FusedAdam if kind == "fused" else DeepSpeedCPUAdam
    check_build_lock("fused_adam" if kind == "fused" else "cpu_adam")  # the op it loads
    return optimizer_class(param_groups, lr=train.learning_rate, betas=ADAM_BETAS)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    return get_scheduler(
        train.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=train.num_warmup_steps,
        num_training_steps=total_steps,
    )
