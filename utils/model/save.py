"""Writing the fine-tuned model as a plain Hugging Face folder.

Rank 0 writes the whole folder (weights, tokenizer, generation config, and the LoRA
adapter when asked) under a temporary name inside the output directory, flushes it and
gives it the user's umask modes, then `utils/model/publish.py` puts it in place so that
a kill at any moment leaves the previous model or a folder marked incomplete. A full disk
ends in one message with the sizes and what to do, before anything is overwritten.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from utils.distributed import is_main_process, rank_zero_first
from utils.errors import UserError
from utils.files import fsync_tree, is_disk_full, share_tree
from utils.model.lora import iter_merged_tensors, lora_state_dict
from utils.model.publish import JOURNAL, LORA_ADAPTER_DIR, STAGING_PREFIX, publish_folder

# Room kept beyond the weights: tokenizer and config files, file-system rounding.
SPARE_BYTES = 64 * 1024**2


class DiskFullError(UserError):
    """Not enough free space for the model folder."""


def iter_model_tensors(
    model: torch.nn.Module, zero_stage: int, keep: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor the saved folder holds, one at a time, as full-size CPU copies (none
    on ranks with keep=False). At ZeRO-3 each parameter (each LoRA layer) is gathered in
    turn, so every rank must exhaust the iterator; memory stays one tensor above the model.
    """
    import deepspeed

    if isinstance(model, PeftModel):  # LoRA: a plain model with the adapters folded in
        yield from iter_merged_tensors(model, _zero3_gather(zero_stage), keep)
        return
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=zero_stage == 3):
            if keep:
                yield name, param.detach().to("cpu", copy=True)
    for name, buffer in model.named_buffers():
        if keep and _is_persistent(model, name):
            yield name, buffer.detach().to("cpu", copy=True)


def gather_state_dict(model: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full-size CPU tensors of every parameter and buffer, on rank 0 (None elsewhere)."""
    state = dict(iter_model_tensors(model, zero_stage, keep=is_main_process()))
    return state if is_main_process() else None


def _zero3_gather(zero_stage: int):
    import deepspeed

    return lambda params: deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3)


def _is_persistent(model: torch.nn.Module, name: str) -> bool:
    module_name, _, buffer_name = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return buffer_name not in module._non_persistent_buffers_set


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights as saved (its parameters and buffers in their dtypes)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(getattr(t, "ds_numel", t.numel()) * t.element_size() for t in tensors)


def check_disk_space(model: torch.nn.Module, output_dir: str, advice: str) -> None:
    """DiskFullError on every rank unless rank 0 finds room for the model in output_dir."""
    needed = model_bytes(model)
    with rank_zero_first("check the free disk space"):
        if is_main_process():
            _check_room(output_dir, needed, advice)


def save_hf_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str,
    zero_stage: int,
    lora_adapter: bool = False,
    if_disk_full: str = "",
) -> None:
    """Save config, safetensors weights, tokenizer and generation config to `output_dir`
    (and PEFT's adapter folder as output_dir/lora_adapter with `lora_adapter`).

    `if_disk_full`: what the user can do when there is no room (the checkpoint holding
    the trained weights, if any); it ends the DiskFullError message.
    """
    check_disk_space(model, output_dir, if_disk_full)
    state = gather_state_dict(model, zero_stage)
    adapter = None
    if lora_adapter:
        adapter = lora_state_dict(model, _zero3_gather(zero_stage), keep=is_main_process())
    with rank_zero_first(f"write the model to {output_dir}"):
        if is_main_process():
            try:
                write_model_folder(model, tokenizer, state, adapter, output_dir)
            except Exception as err:
                if not is_disk_full(err):
                    raise
                raise _disk_full(output_dir, model_bytes(model), if_disk_full) from None


def write_model_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    state: dict[str, torch.Tensor],
    adapter: dict[str, torch.Tensor] | None,
    output_dir: str,
) -> None:
    """Write the folder under a temporary name in output_dir, then publish it (rank 0)."""
    os.makedirs(output_dir, exist_ok=True)
    plain = model.get_base_model() if isinstance(model, PeftModel) else model
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_dir)
    try:
        plain.config.use_cache = True  # generation after loading wants the KV cache
        plain.save_pretrained(staging, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if getattr(plain, "generation_config", None) is not None:
            plain.generation_config.save_pretrained(staging)
        if adapter is not None:
            model.save_pretrained(os.path.join(staging, LORA_ADAPTER_DIR), state_dict=adapter)
        fsync_tree(staging)
        share_tree(staging)
        publish_folder(staging, output_dir)
    finally:
        plain.config.use_cache = False
        if not os.path.exists(os.path.join(output_dir, JOURNAL)):  # else: the next run needs it
            shutil.rmtree(staging, ignore_errors=True)


def _check_room(output_dir: str, needed: int, advice: str) -> None:
    if _free_bytes(output_dir) < needed + needed // 50 + SPARE_BYTES:
        raise _disk_full(output_dir, needed, advice)


def _disk_full(output_dir: str, needed: int, advice: str) -> DiskFullError:
    free = _free_bytes(output_dir)
    return DiskFullError(
        f"no room for the model in --output_dir {output_dir}: its weights need about "
        f"{_gb(needed + SPARE_BYTES)} and the file system has {_gb(free)} free. "
        f"{advice + ' ' if advice else ''}Free space there or choose another --output_dir."
    )


def _free_bytes(path: str) -> int:
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # the folder may not exist yet
        existing = os.path.dirname(existing)
    return shutil.disk_usage(existing).free


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
