"""Writing the fine-tuned model as a plain Hugging Face folder.

The folder is first written complete under a temporary name inside the output
directory, then its files are moved in with config.json last: config.json is the
commit marker, so a folder interrupted mid-publish fails to load instead of
loading a mix of old and new weights. The output directory itself is kept because
it also holds the run's logs.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from utils.distributed import barrier, is_main_process
from utils.model.lora import lora_state_dict, merged_state_dict

COMMIT_MARKER = "config.json"
LORA_ADAPTER_DIR = "lora_adapter"


def gather_state_dict(model: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full-size CPU tensors of every parameter and buffer, on rank 0 (None elsewhere).

    At ZeRO-3 each rank holds a shard; parameters are gathered one at a time (every
    rank must take part) so peak memory stays one tensor above the model itself.
    """
    import deepspeed

    if isinstance(model, PeftModel):  # LoRA: a plain model with the adapters folded in
        gather = _zero3_gather(zero_stage)
        return merged_state_dict(model, gather, keep=is_main_process()) or None
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=zero_stage == 3):
            if is_main_process():
                state[name] = param.detach().to("cpu", copy=True)
    for name, buffer in model.named_buffers():
        if is_main_process() and _is_persistent(model, name):
            state[name] = buffer.detach().to("cpu", copy=True)
    return state if is_main_process() else None


def _zero3_gather(zero_stage: int):
    import deepspeed

    return lambda params: deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3)


def _is_persistent(model: torch.nn.Module, name: str) -> bool:
    module_name, _, buffer_name = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return buffer_name not in module._non_persistent_buffers_set


def save_hf_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str,
    zero_stage: int,
) -> None:
    """Save config, safetensors weights, tokenizer and generation config to `output_dir`."""
    state = gather_state_dict(model, zero_stage)
    if is_main_process():
        plain = model.get_base_model() if isinstance(model, PeftModel) else model
        publish_hf_folder(plain, tokenizer, state, output_dir)
    barrier()


def save_lora_adapter(model: PeftModel, output_dir: str, zero_stage: int) -> None:
    """PEFT's adapter folder at output_dir/lora_adapter (loadable with PeftModel.from_pretrained),
    written under a temporary name and renamed into place."""
    state = lora_state_dict(model, _zero3_gather(zero_stage), keep=is_main_process())
    if is_main_process():
        target = os.path.join(output_dir, LORA_ADAPTER_DIR)
        staging = tempfile.mkdtemp(prefix=".saving-", dir=output_dir)
        try:
            model.save_pretrained(staging, state_dict=state)
            fsync_tree(staging)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    barrier()


def publish_hf_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    state: dict[str, torch.Tensor],
    output_dir: str,
) -> None:
    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".saving-", dir=output_dir)
    try:
        model.config.use_cache = True  # generation after loading wants the KV cache
        model.save_pretrained(staging, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        fsync_tree(staging)
        marker = os.path.join(output_dir, COMMIT_MARKER)
        if os.path.exists(marker):
            os.remove(marker)  # invalidate the old model before any of its files change
        names = sorted(os.listdir(staging), key=lambda n: n == COMMIT_MARKER)
        for name in names:  # config.json last
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    finally:
        model.config.use_cache = False
        shutil.rmtree(staging, ignore_errors=True)


def fsync_tree(folder: str) -> None:
    """Flush every file under `folder` to disk before it is published by a rename."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
