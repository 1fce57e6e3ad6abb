"""Refusing checkpoints this run cannot continue exactly, with what differs and what to do.

Checked before the DeepSpeed engine exists (from run_state.json, no tensors loaded), so
a refusal costs seconds, not a model load and an optimizer build.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from utils.errors import UserError

RUN_STATE = "run_state.json"  # written last: its presence marks a complete checkpoint


@dataclass
class RunShape:
    """What must match between the run that saved a checkpoint and the one resuming it."""

    world_size: int
    zero_stage: int
    param_shapes: dict[str, list[int]]


def run_shape(model: torch.nn.Module, world_size: int, zero_stage: int) -> RunShape:
    # ds_shape: at ZeRO-3 a parameter's own shape is that of its (possibly empty) shard.
    shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    return RunShape(world_size=world_size, zero_stage=zero_stage, param_shapes=shapes)


def check_resumable(path: str, current: RunShape) -> dict:
    """The checkpoint's run_state.json, or a UserError saying why this run cannot continue it."""
    with open(os.path.join(path, RUN_STATE)) as f:
        state = json.load(f)
    saved = RunShape(**state["shape"])
    universal = (
        "To change it, convert the checkpoint with DeepSpeed's universal checkpoint tool "
        f"(python -m deepspeed.checkpoint.ds_to_universal --input_folder {path} "
        "--output_folder <new folder>) and start a new run from the converted weights; "
        "the data position and RNG streams of this run cannot follow a different layout."
    )
    if saved.param_shapes != current.param_shapes:
        raise UserError(
            f"checkpoint {path} is of a different model: {_shape_difference(saved, current)}. "
            "Resume with the same --model_name_or_path, tokenizer and LoRA flags it was "
            "trained with, or start a new run in another --output_dir."
        )
    if saved.zero_stage != current.zero_stage:
        raise UserError(
            f"checkpoint {path} was written at ZeRO stage {saved.zero_stage}, this run uses "
            f"stage {current.zero_stage}. Resume with --zero_stage {saved.zero_stage}. {universal}"
        )
    if saved.world_size != current.world_size:
        raise UserError(
            f"checkpoint {path} was written by {saved.world_size} ranks, this run has "
            f"{current.world_size}. Relaunch with {saved.world_size} processes (e.g. deepspeed "
            f"--num_gpus {saved.world_size} main.py ...). {universal}"
        )
    missing = [name for name in state["files"] if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise UserError(
            f"checkpoint {path} is incomplete: {', '.join(missing)} missing (each rank writes "
            "its own file; was the folder copied partly?). Copy the whole folder from where it "
            "was written, or resume from an earlier checkpoint."
        )
    return state


def _shape_difference(saved: RunShape, current: RunShape) -> str:
    only_saved = sorted(set(saved.param_shapes) - set(current.param_shapes))
    only_current = sorted(set(current.param_shapes) - set(saved.param_shapes))
    if only_saved or only_current:
        return f"parameters only in the checkpoint {only_saved[:3]}, only in this model {only_current[:3]}"
    name = next(n for n in saved.param_shapes if saved.param_shapes[n] != current.param_shapes[n])
    return f"{name} is {saved.param_shapes[name]} there and {current.param_shapes[name]} here"
