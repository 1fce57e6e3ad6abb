"""Check the published model folder against the model that was trained.

DeepSpeed-Chat users have shipped folders of empty ZeRO-3 weights without noticing. After
the final save two checks run, each sized to scale:

1. Tensors, for every model: each tensor of the trained model (gathered one at a time at
   ZeRO-3, every rank taking part) is compared bit for bit with the tensor of that name in
   the files from_pretrained reads, memory-mapped through safetensors' `safe_open`. Memory
   stays one tensor whatever the model's size. Catches missing, extra, stale and corrupted
   tensors.
2. Logits, for models that fit comfortably (RELOAD_MAX_BYTES in fp32, and half of rank 0's
   available memory): rank 0 reloads the folder with from_pretrained on its CPU and compares
   its logits on an eval row with the trained model's. Catches what tensors cannot show:
   a wrong config.json, tied weights, buffers the loader rebuilds.

While rank 0 compares alone, the other ranks wait in rank_zero_first's bounded wait, not in
a collective that can time out.
"""

from __future__ import annotations

import contextlib
import json
import os

import psutil
import torch
from peft import PeftModel
from safetensors import safe_open
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from utils.distributed import DistInfo, print_rank_0, rank_zero_first
from utils.model.save import iter_model_tensors

# Largest |saved - trained| logit difference accepted, relative to the largest |logit|:
# fp32 differs only by kernel choice (CPU vs accelerator); fp16/bf16 training weights are
# compared with an fp32 reload, so rounding of the activations is allowed for.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
# The fp32 reload of the logits check: a 0.5B model. Larger ones get the tensor check only.
RELOAD_MAX_BYTES = 2 * 1024**3
SHOWN = 5  # mismatching tensors named in the error


class SavedModelMismatch(RuntimeError):
    """The folder on disk does not reproduce the trained model."""


@torch.no_grad()
def verify_saved_model(
    engine, output_dir: str, eval_loader: DataLoader, dist: DistInfo, trust_remote_code: bool
) -> None:
    model, zero_stage = engine.module, engine.zero_optimization_stage()
    # Decided from the parameter count alone, so every rank agrees (the forward is collective).
    reload = _fp32_bytes(model) <= RELOAD_MAX_BYTES
    if reload:
        batch, trained, dtype = _trained_logits(engine, eval_loader, dist)
    problem, count = compare_tensors(model, zero_stage, output_dir, dist.is_main)
    with rank_zero_first(f"verify the model saved in {output_dir}"):
        if dist.is_main:
            reload = reload and _fp32_bytes(model) * 2 <= psutil.virtual_memory().available
            if not problem and reload:
                problem = _compare_logits(output_dir, batch, trained, dtype, trust_remote_code)
            if problem:
                raise SavedModelMismatch(problem)
    how = "and from_pretrained reproduces the trained model's logits"
    if not reload:
        how = (
            f"(the logits check reloads models under {RELOAD_MAX_BYTES / 1e9:.1f} GB in fp32 only)"
        )
    print_rank_0(f"verified {output_dir}: its {count} tensors equal the trained ones {how}")


def compare_tensors(
    model: torch.nn.Module, zero_stage: int, output_dir: str, is_main: bool
) -> tuple[str | None, int]:
    """(What differs, or None; how many tensors were compared) on rank 0.

    Every rank calls it: at ZeRO-3 each tensor is gathered by all; below ZeRO-3 the other
    ranks return at once (rank 0 holds every weight).
    """
    if not is_main:
        for _ in iter_model_tensors(model, zero_stage, keep=False) if zero_stage == 3 else ():
            pass
        return None, 0
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    aliases = _aliases(base)
    with contextlib.ExitStack() as stack:
        files = _weight_files(output_dir)
        if isinstance(files, str):
            for _ in iter_model_tensors(model, zero_stage, keep=False):
                pass
            return _mismatch(output_dir, [files]), 0
        handles = {
            f: stack.enter_context(safe_open(f, framework="pt")) for f in set(files.values())
        }
        problems, found = [], set()
        for name, tensor in iter_model_tensors(model, zero_stage, keep=True):
            for saved_name, trained in _as_saved(base, name, tensor).items():
                names = [n for n in aliases.get(saved_name, [saved_name]) if n in files]
                if not names:
                    problems.append(f"{saved_name} is missing")
                    continue
                found.update(names)
                saved = handles[files[names[0]]].get_tensor(names[0])
                if not _identical(saved, trained):
                    problems.append(f"{names[0]} {_difference(saved, trained)}")
        problems += [
            f"{n} is not a tensor of the trained model" for n in sorted(files.keys() - found)
        ]
    return (_mismatch(output_dir, problems) if problems else None), len(found)


def _weight_files(output_dir: str) -> dict[str, str] | str:
    """Tensor name -> file, from the files from_pretrained reads (a single model.safetensors
    wins over a shard index, as in transformers); a string says why there are none."""
    single = os.path.join(output_dir, "model.safetensors")
    index = os.path.join(output_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(output_dir, file) for name, file in weight_map.items()}
    return "it has no model.safetensors or model.safetensors.index.json"


def _aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """Every name of each tied tensor (lm_head sharing the embedding is saved under one)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {name: group for group in names.values() if len(group) > 1 for name in group}


def _as_saved(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensor under the name(s) save_pretrained writes it as: transformers 5 reverts
    the weight conversions of some architectures (fused MoE experts) when saving."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 saves state-dict names unchanged
        return {name: tensor}
    try:
        return revert_weight_conversion(model, {name: tensor}) or {name: tensor}
    except Exception:  # a conversion that needs its sibling tensors: compare it unconverted
        return {name: tensor}


def _identical(saved: torch.Tensor, trained: torch.Tensor) -> bool:
    if saved.dtype != trained.dtype or saved.shape != trained.shape:
        return False
    # Bit for bit: the file is a copy, not an approximation (and NaN equals NaN here).
    as_bytes = [t.contiguous().reshape(-1).view(torch.uint8) for t in (saved, trained)]
    return torch.equal(*as_bytes)


def _difference(saved: torch.Tensor, trained: torch.Tensor) -> str:
    if saved.shape != trained.shape:
        return f"has shape {list(saved.shape)}, trained {list(trained.shape)}"
    if saved.dtype != trained.dtype:
        return f"is {saved.dtype}, trained {trained.dtype}"
    diff = (saved.double() - trained.double()).abs().max().item()
    return f"differs by up to {diff:.3g}"


def _mismatch(output_dir: str, problems: list[str]) -> str:
    shown = "; ".join(problems[:SHOWN]) + (
        f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    )
    return (
        f"the model saved in {output_dir} does not reproduce the trained model: {shown}. The "
        "folder is not a faithful copy (were ZeRO-3 weights gathered? did something else write "
        "there?); do not use it. The last checkpoint, if any, still holds the trained state."
    )


def _trained_logits(engine, eval_loader: DataLoader, dist: DistInfo):
    # Any rows show a bad copy; a rank without eval rows still joins the ZeRO-3 forward.
    batch = next(iter(eval_loader), None) or _probe_batch()
    batch = {k: v[:1] for k, v in batch.items()}  # one row: the fp32 CPU reload stays cheap
    inputs = {k: v.to(dist.device) for k, v in batch.items() if k != "labels"}
    engine.eval()
    logits = engine(**inputs, use_cache=False).logits
    engine.train()
    # The precision the logits were computed in: the weights' under DeepSpeed's fp16/bf16,
    # the autocast dtype with fp32 weights under torch.autocast.
    return batch, logits.float().cpu(), logits.dtype


def _compare_logits(
    output_dir: str, batch: dict, trained: torch.Tensor, dtype: torch.dtype, trust_remote_code: bool
) -> str | None:
    saved_model = AutoModelForCausalLM.from_pretrained(
        output_dir, dtype=torch.float32, trust_remote_code=trust_remote_code
    ).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    saved = saved_model(**inputs, use_cache=False).logits.float()
    real = batch["attention_mask"].bool()  # padding positions are never trained or used
    diff = (saved - trained)[real].abs().max().item()
    scale = max(trained[real].abs().max().item(), 1.0)
    tolerance = TOLERANCE.get(dtype, 1e-3)
    if diff <= tolerance * scale:
        return None
    return (
        f"the model saved in {output_dir} does not reproduce the trained model: its logits "
        f"differ by up to {diff:.3g} (allowed {tolerance * scale:.3g}) on an eval batch. The "
        "folder is not a faithful copy (is its config.json the trained model's?); do not use "
        "it. The last checkpoint, if any, still holds the trained state."
    )


def _fp32_bytes(model: torch.nn.Module) -> int:
    return 4 * sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def _probe_batch() -> dict[str, torch.Tensor]:
    ids = torch.arange(1, 9).unsqueeze(0)  # [1, 8], ids every vocabulary has
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
