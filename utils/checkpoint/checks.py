"""Refusing checkpoints this run cannot continue exactly, with what differs and what to do.

Checked before the model loads (run_state.json, the files' zip directories, and the
parameter shapes of the model built on the meta device; no tensor is loaded), so a refusal
costs seconds, not a model load and an optimizer build. A checkpoint of another model
trained with other settings is refused once, listing the model and every setting.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass

import torch

from utils.checkpoint.settings import geometry, settings_changes
from utils.checkpoint.trust import refuse_untrusted
from utils.distributed import print_rank_0
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
    model: str = ""  # the --model_name_or_path it was built from (for messages; "": unknown)


def run_shape(model: torch.nn.Module, world_size: int, zero_stage: int) -> RunShape:
    return RunShape(world_size, zero_stage, param_shapes(model), model.config.name_or_path)


def param_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    # ds_shape: at ZeRO-3 a parameter's own shape is that of its (possibly empty) shard.
    return {n: list(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}


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


MODEL_FIX = "Resume with the --model_name_or_path, tokenizer and LoRA flags it was trained with"


def vet_checkpoint(
    path: str, settings: dict, planned: torch.nn.Module | None, trusted: bool
) -> dict:
    """The run_state.json of checkpoint `path` once it is safe to read and this run can
    continue it; else one UserError with every problem (`refuse_mismatch`)."""
    if not trusted:
        refuse_untrusted(path)  # before anything in it is read
    state = read_run_state(path)
    refuse_mismatch(path, state, settings, planned)
    saved = state["settings"]
    if geometry(saved) != geometry(settings):
        print_rank_0(
            f"checkpoint {path}: micro-batch x ranks x accumulation {geometry(saved)} "
            f"-> {geometry(settings)} (the same global batch and schedule)"
        )
    return state


def refuse_mismatch(
    path: str, state: dict, settings: dict, planned: torch.nn.Module | None
) -> None:
    """One UserError listing every way this run differs from the one that wrote the
    checkpoint: its settings, and its model (`planned`: this run's, built on the meta
    device; None: the model is compared later, by check_model)."""
    changes = settings_changes(state["settings"], settings)
    saved = RunShape(**state["shape"])
    difference = planned and model_difference(
        saved, param_shapes(planned), planned.config.name_or_path
    )
    if not changes and not difference:
        return
    problems, what = [], []
    if difference:
        fix = f"; pass --model_name_or_path {saved.model}" if saved.model else ""
        problems.append(f"the model: {difference}{fix}")
        what.append("from another model")
    if changes:
        problems += changes
        what.append("with other settings")
    fix = f"{MODEL_FIX} and its settings" if difference else "Resume with the checkpoint's settings"
    raise UserError(
        "\n".join(
            [
                f"checkpoint {path} was trained {' and '.join(what)}; continuing it with these "
                "would change the run (its model, data order, schedule or optimisation):",
                *(f"  - {problem}" for problem in problems),
                f"{fix}, or start a new run in another --output_dir.",
            ]
        )
    )


def check_model(path: str, state: dict, current: RunShape) -> None:
    """The checkpoint holds this model: the same parameters with the same shapes."""
    saved = RunShape(**state["shape"])
    if difference := model_difference(saved, current.param_shapes, current.model):
        raise UserError(
            f"checkpoint {path} is of a different model: {difference}. {MODEL_FIX}, or "
            "start a new run in another --output_dir."
        )


def model_difference(saved: RunShape, shapes: dict[str, list[int]], model_path: str) -> str | None:
    """How the checkpoint's parameters differ from `shapes`, those of the model built from
    `model_path` (None: they are alike)."""
    if saved.param_shapes == shapes:
        return None
    origin = f", trained from {saved.model}" if saved.model else ""
    return (
        f"{_shape_difference(saved.param_shapes, shapes)} (the checkpoint's "
        f"{_count(saved.param_shapes):,} parameters{origin}; --model_name_or_path {model_path} "
        f"makes {_count(shapes):,})"
    )


def _count(shapes: dict[str, list[int]]) -> int:
    return sum(math.prod(shape) for shape in shapes.values())


def _shape_difference(saved: dict[str, list[int]], current: dict[str, list[int]]) -> str:
    only_saved = sorted(set(saved) - set(current))
    only_current = sorted(set(current) - set(saved))
    if only_saved or only_current:
        return f"parameters only in the checkpoint {only_saved[:3]}, only in this model {only_current[:3]}"
    name = next(n for n in saved if saved[n] != current[n])
    return f"{name} is {saved[name]} there and {current[name]} here"
