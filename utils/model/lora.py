"""LoRA through PEFT, driven by DeepSpeed-Chat's flags.

`apply_lora` wraps the selected linear layers in PEFT LoRA adapters; saving folds
the adapters back into the base weights (`merged_state_dict`) so the output folder
is a plain transformers model, and `lora_state_dict` feeds PEFT's adapter folder.
Both take a `gather` context (DeepSpeed's `GatheredParameters` under
ZeRO-3) so this module never imports DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import TypeAlias

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer, LoraModel
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from utils.errors import UserError
from utils.model.config import LoraConfig

DEFAULT_SCOPE = LoraConfig.lora_module_name
# Tried in order when the user keeps the OPT default and it matches nothing.
FAMILY_SCOPES = {"LLaMA-style": "model.layers.", "GPT-2-style": "transformer.h."}
ADAPTER = "default"

Gather: TypeAlias = Callable[[list[nn.Parameter]], AbstractContextManager]


def _no_gather(params: list[nn.Parameter]) -> AbstractContextManager:
    return nullcontext()


def _linear_layer_names(model: nn.Module) -> list[str]:
    # GPT-2-style models implement their projections as transformers' Conv1D.
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)]


def _is_checkpointing(model: PreTrainedModel) -> bool:
    # transformers 5 renamed the property (the old name warns); 4.x has only the old one.
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def resolve_lora_targets(model: nn.Module, module_name: str) -> list[str]:
    """Qualified names of the linear layers LoRA wraps: those whose name contains `module_name`.

    When `module_name` is the OPT default and matches nothing, the LLaMA-style and
    GPT-2-style layer scopes are tried instead. A scope matching nothing is a UserError.
    """
    linears = _linear_layer_names(model)
    scopes = [module_name]
    if module_name == DEFAULT_SCOPE:
        scopes += list(FAMILY_SCOPES.values())
    for scope in scopes:
        targets = [n for n in linears if scope in n]
        if targets:
            return targets
    examples = ", ".join(linears[:6]) or "(none)"
    raise UserError(
        f"--lora_module_name {module_name!r} matches no linear layer of "
        f"{type(model).__name__}; its linear layers include: {examples}. "
        "Pass a substring of the names to adapt (e.g. the decoder-layer prefix)."
    )


def adapts_output_layer(model: nn.Module, cfg: LoraConfig) -> bool:
    """Whether LoRA would wrap the model's output layer (--lora_module_name matches its name):
    the chunked loss then cannot run the layer's own forward in its place."""
    if not cfg.enabled:
        return False
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), None)
    return name in resolve_lora_targets(model, cfg.lora_module_name)


def apply_lora(model: PreTrainedModel, cfg: LoraConfig) -> nn.Module:
    """Wrap the target linear layers in LoRA adapters; return the model to train.

    Scaling is 1/rank as in DeepSpeed-Chat (lora_alpha=1), adapters start as a no-op
    (B=0). With `only_optimize_lora` only the adapters train; otherwise the base
    weights train too (the optimizer gives LoRA weights their own learning rate).
    """
    if not cfg.enabled:
        return model
    targets = resolve_lora_targets(model, cfg.lora_module_name)
    peft_cfg = PeftLoraConfig(
        r=cfg.lora_dim,
        lora_alpha=1,
        lora_dropout=0.0,
        target_modules=targets,
        fan_in_fan_out=any(isinstance(model.get_submodule(t), Conv1D) for t in targets),
        bias="none",
    )
    lora_model = get_peft_model(model, peft_cfg)
    if cfg.only_optimize_lora:
        # Reentrant checkpointing (older transformers' default) drops gradients when
        # no input of a checkpointed block requires grad, which is the case once the
        # embeddings are frozen; making the embedding output require grad keeps the
        # gradient flowing to the LoRA weights whatever checkpointing flavour is on.
        if _is_checkpointing(model):
            model.enable_input_require_grads()
    else:
        for param in lora_model.parameters():
            param.requires_grad_(True)
    return lora_model


def is_lora_parameter(name: str) -> bool:
    """True for parameters PEFT's LoRA added (they train at --lora_learning_rate)."""
    return LoraModel.prefix in name


def _own_tensors(
    module: nn.Module, prefix: str, seen: set[int]
) -> Iterator[tuple[str, torch.Tensor]]:
    # A tied weight (lm_head sharing the embedding) is saved once, as save_pretrained expects.
    for name, param in module.named_parameters(recurse=False):
        if id(param) not in seen:
            seen.add(id(param))
            yield prefix + name, param
    for name, buf in module.named_buffers(recurse=False):
        if name not in module._non_persistent_buffers_set:
            yield prefix + name, buf


def merged_state_dict(
    model: nn.Module, gather: Gather = _no_gather, keep: bool = True
) -> dict[str, torch.Tensor]:
    """CPU state dict of the plain model: every LoRA delta folded into its base weight.

    Non-destructive (training can continue). Every rank must call it under ZeRO-3 (the
    gather is collective); ranks passing `keep=False` get an empty dict.
    """
    return dict(iter_merged_tensors(model, gather, keep))


def iter_merged_tensors(
    model: nn.Module, gather: Gather = _no_gather, keep: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """merged_state_dict's tensors one at a time, walking one layer at a time, so under
    ZeRO-3 only that layer's parameters are gathered. Every rank must exhaust it."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    seen: set[int] = set()
    lora_prefixes: list[str] = []
    for name, module in base.named_modules():
        prefix = f"{name}." if name else ""
        if any(prefix.startswith(p) for p in lora_prefixes):
            continue  # base_layer / lora_A / lora_B of a LoRA layer handled below
        if isinstance(module, LoraLayer):
            lora_prefixes.append(prefix)
            with gather(list(module.parameters())):
                tensors = dict(_own_tensors(module.base_layer, prefix, seen))
                weight = tensors[prefix + "weight"]
                delta = module.get_delta_weight(ADAPTER).float()
                tensors[prefix + "weight"] = (weight.float() + delta).to(weight.dtype)
                if keep:
                    yield from ((k, v.detach().cpu().clone()) for k, v in tensors.items())
            continue
        params = list(module.parameters(recurse=False))
        with gather(params):
            if keep:
                for k, v in _own_tensors(module, prefix, seen):
                    yield k, v.detach().cpu().clone()


def lora_state_dict(
    model: nn.Module, gather: Gather = _no_gather, keep: bool = True
) -> dict[str, torch.Tensor]:
    """CPU copies of the LoRA weights under their PEFT names (collective under ZeRO-3)."""
    lora = [(n, p) for n, p in model.named_parameters() if is_lora_parameter(n)]
    with gather([p for _, p in lora]):
        return {n: p.detach().cpu().clone() for n, p in lora} if keep else {}
