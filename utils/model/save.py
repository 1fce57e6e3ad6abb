"""Writing the fine-tuned model as a plain Hugging Face folder.

Rank 0 writes the whole folder (weights, tokenizer, generation config, and the LoRA
adapter when asked) under a temporary name inside the output directory, flushes it and
gives it the user's umask modes, then `utils/model/publish.py` puts it in place so that
a kill at any moment leaves the previous model or a folder marked incomplete.

A full disk (or quota), found before writing or by a failed write, never overwrites
anything. The process still holds the trained weights, so the save says how much room it
needs and how much is free, then waits for room and retries (up to
--disk_full_wait_minutes), so that the user can free space and lose nothing. When the
wait ends (the bound, or Ctrl-C) one message says so and where the weights survive, if
anywhere. The other ranks wait for rank 0 polling, not in a collective (utils/distributed.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from utils.distributed import is_main_process, print_rank_0, rank_zero_first, warn_rank_0
from utils.errors import UserError
from utils.files import free_bytes, fsync_tree, human_bytes, is_disk_full, share_tree
from utils.model.lora import iter_merged_tensors, lora_state_dict
from utils.model.publish import JOURNAL, LORA_ADAPTER_DIR, STAGING_PREFIX, publish_folder

# Room kept beyond the weights: tokenizer and config files, file-system rounding.
SPARE_BYTES = 64 * 1024**2
POLL_SECONDS = 5  # how often a save waiting for room looks at the free space
PROGRESS_SECONDS = 600  # how often it says it is still waiting


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
    wait_minutes: float = 0,
) -> None:
    """Save config, safetensors weights, tokenizer and generation config to `output_dir`
    (and PEFT's adapter folder as output_dir/lora_adapter with `lora_adapter`).

    `if_disk_full`: what the user can do when there is no room (the checkpoint holding
    the trained weights, if any); it ends the DiskFullError message. `wait_minutes`: how
    long rank 0 waits for room, in all, before giving up (--disk_full_wait_minutes).
    """
    needed, deadline = model_bytes(model), time.monotonic() + 60 * wait_minutes
    with rank_zero_first("find room for the model"):
        if is_main_process():
            wait_for_room(output_dir, needed, if_disk_full, deadline)
    state = gather_state_dict(model, zero_stage)
    adapter = None
    if lora_adapter:
        adapter = lora_state_dict(model, _zero3_gather(zero_stage), keep=is_main_process())
    with rank_zero_first(f"write the model to {output_dir}"):
        if is_main_process():
            while not _wrote(model, tokenizer, state, adapter, output_dir):
                # The room it had was not enough (a quota, another writer): wait for more.
                beyond = free_bytes(output_dir)
                wait_for_room(output_dir, needed, if_disk_full, deadline, beyond)


def wait_for_room(
    output_dir: str, needed: int, advice: str, deadline: float, beyond: int = 0
) -> None:
    """Return once output_dir's file system has room for weights of `needed` bytes (and,
    after a failed write, SPARE_BYTES more free than the `beyond` it had then), polling
    until `deadline` (time.monotonic()); else DiskFullError, also on Ctrl-C. Rank 0."""
    want = max(room_for(needed), beyond + SPARE_BYTES)
    free = free_bytes(output_dir)
    if free >= want:
        return
    if time.monotonic() >= deadline:
        raise DiskFullError(_no_room(output_dir, needed, advice))
    minutes = round((deadline - time.monotonic()) / 60)
    warn_rank_0(
        f"no room for the model in --output_dir {output_dir}: it needs {human_bytes(want)} "
        f"free and the file system has {human_bytes(free)}. Waiting up to {minutes} minutes "
        "(--disk_full_wait_minutes) for room: free space there and the save goes on. Ctrl-C "
        f"stops waiting; then: {advice or 'the trained weights are lost.'}"
    )
    noted = time.monotonic()
    try:
        while (free := free_bytes(output_dir)) < want:
            if time.monotonic() >= deadline:
                raise DiskFullError(
                    f"{_no_room(output_dir, needed, advice)} (Waited {minutes} minutes for room.)"
                )
            if time.monotonic() - noted >= PROGRESS_SECONDS:
                left = round((deadline - time.monotonic()) / 60)
                print_rank_0(
                    f"still waiting for room in {output_dir}: {human_bytes(free)} free of "
                    f"{human_bytes(want)} needed; {left} minutes left"
                )
                noted = time.monotonic()
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        raise DiskFullError(
            f"stopped waiting for room (Ctrl-C): {_no_room(output_dir, needed, advice)}"
        ) from None
    print_rank_0(f"{output_dir} has room now ({human_bytes(free)} free): saving the model")


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


def _wrote(model, tokenizer, state, adapter, output_dir: str) -> bool:
    """write_model_folder; False when the disk (or quota) filled, leaving nothing behind."""
    try:
        write_model_folder(model, tokenizer, state, adapter, output_dir)
    except Exception as err:
        if not is_disk_full(err):
            raise
        return False
    return True


def room_for(needed: int) -> int:
    """Free bytes a model folder with weights of `needed` bytes wants (2% for file-system
    overhead, SPARE_BYTES for the tokenizer and configs)."""
    return needed + needed // 50 + SPARE_BYTES


def _check_room(output_dir: str, needed: int, advice: str) -> None:
    if free_bytes(output_dir) < room_for(needed):
        raise DiskFullError(_no_room(output_dir, needed, advice))


def _no_room(output_dir: str, needed: int, advice: str) -> str:
    return (
        f"no room for the model in --output_dir {output_dir}: its weights need about "
        f"{human_bytes(room_for(needed))} with the file system's overhead, and it has "
        f"{human_bytes(free_bytes(output_dir))} free. {advice + ' ' if advice else ''}Free "
        "space there or choose another --output_dir."
    )
