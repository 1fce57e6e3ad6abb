"""Refusing checkpoints this run cannot continue exactly, with what differs and what to do.

Checked before the DeepSpeed engine exists (run_state.json, the files' zip directories and
the model's parameter shapes; no tensor is loaded), so a refusal costs seconds, not a model
load and an optimizer build.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass

import torch

from utils.errors import UserError

PREFIX = "checkpoint-"
RUN_STATE = "run_state.json"  # written last: its presence marks a complete checkpoint
STATE_KEYS = ("step", "position", "shape", "settings", "files")


@dataclass
class RunShape:
    """How the run that saved a checkpoint was laid out: ranks, ZeRO stage, parameters."""

    world_size: int
    zero_stage: int
    param_shapes: dict[str, list[int]]


def run_shape(model: torch.nn.Module, world_size: int, zero_stage: int) -> RunShape:
    # ds_shape: at ZeRO-3 a parameter's own shape is that of its (possibly empty) shard.
    shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    return RunShape(world_size=world_size, zero_stage=zero_stage, param_shapes=shapes)


def published_checkpoints(output_dir: str | None) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in `output_dir`, oldest first."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        step = name.removeprefix(PREFIX)
        if name.startswith(PREFIX) and step.isdigit() and os.path.isfile(f"{path}/{RUN_STATE}"):
            found.append((int(step), path))
    return sorted(found)


def read_run_state(path: str) -> dict:
    """The checkpoint's run_state.json, or a UserError naming the file and what to do."""
    file = os.path.join(path, RUN_STATE)
    try:
        with open(file, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(damaged(path, file, f"does not parse: {err}")) from err
    if isinstance(state, dict) and "shape" in state and "settings" not in state:
        raise UserError(
            f"checkpoint {path} was written by an earlier version of this tool, which did not "
            "record the run's settings, so this run cannot check it continues the same run. "
            "Continue it with the version that wrote it, or start a new run."
        )
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
        raise UserError(damaged(path, file, f"lacks some of {', '.join(STATE_KEYS)}"))
    return state


def check_files(path: str, state: dict) -> None:
    """Every file the checkpoint was written with is there and is a whole torch archive.

    torch.save writes zip archives whose directory is at the end, so reading the directory
    (a few KB per file) finds a truncated or overwritten file without loading any tensor.
    """
    missing = [name for name in state["files"] if not os.path.exists(os.path.join(path, name))]
    if missing:
        raise UserError(
            f"checkpoint {path} is incomplete: {', '.join(missing)} missing (each rank writes "
            "its own file; was the folder copied partly?). Copy the whole folder from where it "
            f"was written, or {earlier_checkpoint_advice(path)}"
        )
    for name in state["files"]:
        file = os.path.join(path, name)
        if name.endswith(".pt") and os.path.isfile(file):
            try:
                zipfile.ZipFile(file).close()
            except (zipfile.BadZipFile, OSError) as err:
                raise UserError(damaged(path, file, f"is not a whole torch file ({err})")) from err


def find_damaged_file(path: str, state: dict) -> str | None:
    """After a failed load: the first file whose contents fail their zip checksums, if any."""
    for name in state["files"]:
        file = os.path.join(path, name)
        if name.endswith(".pt") and os.path.isfile(file):
            try:
                with zipfile.ZipFile(file) as archive:
                    if archive.testzip() is not None:
                        return file
            except (zipfile.BadZipFile, OSError):
                return file
    return None


def damaged(path: str, file: str, what: str) -> str:
    return (
        f"checkpoint file {file} {what}. The checkpoint is damaged (a disk fault or a partial "
        f"copy); {earlier_checkpoint_advice(path)}"
    )


def earlier_checkpoint_advice(path: str) -> str:
    """What to resume from instead of `path`: the newest complete checkpoint before it."""
    parent, name = os.path.split(os.path.abspath(path))
    step = name.removeprefix(PREFIX)
    earlier = [p for s, p in published_checkpoints(parent) if not step.isdigit() or s < int(step)]
    if not earlier:
        return (
            f"there is no earlier checkpoint in {parent}: start a new run (without "
            "--resume_from_checkpoint, or in another --output_dir)."
        )
    return (
        f"resume from an earlier checkpoint: --resume_from_checkpoint {earlier[-1]} (or delete "
        f"{path}, and 'auto' picks the newest remaining one)."
    )


def check_model(path: str, state: dict, current: RunShape) -> None:
    """The checkpoint holds this model: the same parameters with the same shapes."""
    saved = RunShape(**state["shape"])
    if saved.param_shapes != current.param_shapes:
        raise UserError(
            f"checkpoint {path} is of a different model: {_shape_difference(saved, current)}. "
            "Resume with the same --model_name_or_path, tokenizer and LoRA flags it was "
            "trained with, or start a new run in another --output_dir."
        )


def _shape_difference(saved: RunShape, current: RunShape) -> str:
    only_saved = sorted(set(saved.param_shapes) - set(current.param_shapes))
    only_current = sorted(set(current.param_shapes) - set(saved.param_shapes))
    if only_saved or only_current:
        return f"parameters only in the checkpoint {only_saved[:3]}, only in this model {only_current[:3]}"
    name = next(n for n in saved.param_shapes if saved.param_shapes[n] != current.param_shapes[n])
    return f"{name} is {saved.param_shapes[name]} there and {current.param_shapes[name]} here"
