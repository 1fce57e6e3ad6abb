"""Optimizer parameter groups, the optimizer itself and the learning-rate schedule."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from utils.engine.build_lock import check_build_lock
from utils.engine.config import TrainConfig
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


def build_optimizer(
    param_groups: list[dict], train: TrainConfig, offload: bool
) -> torch.optim.Optimizer:
    """DeepSpeed's fused Adam on CUDA; its vectorised CPU Adam when offloading or on CPU."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    on_cuda = get_accelerator().device_name() == "cuda"
    fused = on_cuda and not offload
    check_build_lock("fused_adam" if fused else "cpu_adam")  # the op the optimizer loads
    optimizer_class = FusedAdam if fused else DeepSpeedCPUAdam
    return optimizer_class(param_groups, lr=train.learning_rate, betas=ADAM_BETAS)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    return get_scheduler(
        train.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=train.num_warmup_steps,
        num_training_steps=total_steps,
    )
