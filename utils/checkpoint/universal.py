"""Resuming a checkpoint on another number of ranks or another ZeRO stage.

A ZeRO-1/2/3 checkpoint holds each rank's slice of flat, padded partitions, so DeepSpeed
loads it only with the world size and stage that wrote it. Its universal checkpoint
(`deepspeed.checkpoint.ds_to_universal`) rewrites one as a folder per parameter (fp32
weights, Adam moments, step) that an engine of any world size and ZeRO stage 1-3 loads
with `{"checkpoint": {"load_universal": true}}` (LR scheduler, step counters and our
client state come along in the model-states file). What DeepSpeed 0.19.8's converter
leaves undone, found by experiment (tests/checkpoint/test_universal.py), `convert_to_universal` does:

- our engine never records `universal_checkpoint_info` (Megatron does), which the
  ZeRO-1/2 converter demands: injected;
- a ZeRO-1/2 engine reads `mp_rank_00_model_states.pt`, a ZeRO-3 engine
  `zero_pp_rank_0_mp_rank_00_model_states.pt`: the converted folder has both;
- `zero/optimizer_state.pt`: ZeRO-3 reads the Adam step from its
  `optimizer_state_dict`, ZeRO-1/2 assert `ds_version`: both written (and the copy of
  rank 0's whole optimizer partition a ZeRO-3 source leaves there is dropped);
- from a ZeRO-3 source the per-parameter files are flat tensors without `step.pt`,
  while ZeRO-1/2 read `{"param": tensor}` in the parameter's shape and restart Adam's
  bias correction at step 1 without `step.pt`: rewritten.

Loading at ZeRO-3 then copies param group 0's hyperparameters (weight decay, lr) onto
every group; `restore_param_groups` puts each group's own back.

ZeRO-0 has no partitions: its checkpoint holds the whole replicated state, loads on any
number of ranks as it is, and cannot become (or be loaded from) a universal checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import pickle
import shutil

import torch

from utils.checkpoint.checks import RunShape
from utils.errors import UserError
from utils.files import fsync_tree

UNIVERSAL_DIR = "universal"  # inside checkpoint-<step>/, so pruning removes it with its source
MARKER = "converted.json"  # written last: a converted folder without it is not ours
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def universal_dir(checkpoint_dir: str) -> str:
    """Where the converted copy of `checkpoint_dir` lives."""
    return os.path.join(checkpoint_dir, UNIVERSAL_DIR)


def describe_shape(shape: RunShape) -> str:
    ranks = "rank" if shape.world_size == 1 else "ranks"
    return f"{shape.world_size} {ranks} at ZeRO stage {shape.zero_stage}"


def describe_change(saved: RunShape, current: RunShape) -> str:
    """What changed, for the resume message: "2 ranks at ZeRO stage 2 -> 1 rank at ZeRO stage 3"."""
    return f"{describe_shape(saved)} -> {describe_shape(current)}"


def needs_conversion(saved: RunShape, current: RunShape) -> bool:
    """True when a checkpoint of shape `saved` loads into `current` only as a universal one.

    Raises UserError for changes no conversion can make (to or from ZeRO stage 0).
    """
    if saved.zero_stage == current.zero_stage == 0:
        return False  # replicated state: any world size loads it as it is
    if 0 in (saved.zero_stage, current.zero_stage) and saved.zero_stage != current.zero_stage:
        fix = (
            "Resume with --zero_stage 0 (on any number of ranks)"
            if saved.zero_stage == 0
            else f"Resume with --zero_stage {saved.zero_stage} (or any stage 1-3, on any number "
            "of ranks: the checkpoint is then converted)"
        )
        raise UserError(
            f"the checkpoint was written by {describe_shape(saved)}; this run has "
            f"{describe_shape(current)}. DeepSpeed's universal checkpoint, which moves training "
            f"state between ZeRO stages, has no ZeRO-0 form. {fix}."
        )
    return saved.world_size != current.world_size or saved.zero_stage != current.zero_stage


def with_universal_loading(ds_config: dict) -> dict:
    """The DeepSpeed config that makes engine.load_checkpoint read a universal checkpoint
    (it must be set before deepspeed.initialize)."""
    checkpoint = {**ds_config.get("checkpoint", {}), "load_universal": True}
    return {**ds_config, "checkpoint": checkpoint}


def convert_to_universal(checkpoint_dir: str, out_dir: str, workers: int = 1) -> str:
    """Convert a ZeRO-1/2/3 checkpoint folder into a universal one at `out_dir` (rank 0 only).

    Built under a temporary name next to `out_dir` and renamed into place when complete,
    so a killed conversion leaves no `out_dir`; an existing complete `out_dir` is reused.
    `workers` > 1 lets DeepSpeed fork processes (faster on big checkpoints).
    """
    if _is_converted(out_dir):
        return out_dir
    if os.path.exists(out_dir):
        raise UserError(
            f"{out_dir} exists but is not a complete conversion (no {MARKER}); delete it and "
            "resume again to convert the checkpoint afresh."
        )
    parent, name = os.path.split(os.path.abspath(out_dir))
    _remove_stale_temps(parent, name)
    temp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    os.makedirs(temp)  # the user's umask, like every file in it
    try:
        staged = os.path.join(temp, name)  # DeepSpeed writes `latest_universal` beside it
        _run_converter(checkpoint_dir, staged, workers)
        _make_loadable_at_every_stage(staged)
        with open(os.path.join(staged, MARKER), "w") as f:
            json.dump({"source": os.path.abspath(checkpoint_dir)}, f)
        fsync_tree(staged)
        try:
            os.rename(staged, out_dir)
        except OSError:
            if not _is_converted(out_dir):  # else another process finished first: fine
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return out_dir


def _run_converter(checkpoint_dir: str, out_dir: str, workers: int) -> None:
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=checkpoint_dir,
        output_folder=out_dir,
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    log = io.StringIO()  # its progress bars would bury our log; shown only if it fails
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
    except FileNotFoundError as err:
        raise UserError(
            f"{checkpoint_dir} has no ZeRO optimizer partitions to convert ({err}): it was "
            "written at ZeRO stage 0, which loads on any number of ranks as it is. Resume "
            "with --zero_stage 0."
        ) from err
    except (
        OSError,
        RuntimeError,
        AssertionError,
        KeyError,
        ValueError,
        pickle.UnpicklingError,
    ) as err:
        raise UserError(
            f"converting {checkpoint_dir} to DeepSpeed's universal format failed "
            f"({type(err).__name__}: {err}). Is the folder complete? Resume from an earlier "
            f"checkpoint, or with the ranks and ZeRO stage that wrote it.\n{log.getvalue()[-2000:]}"
        ) from err


def _make_loadable_at_every_stage(folder: str) -> None:
    """Rewrite the converter's output so a ZeRO-1, 2 or 3 engine loads it (see the top)."""
    zero = os.path.join(folder, "zero")
    common_path = os.path.join(zero, "optimizer_state.pt")
    common = _load(common_path)
    flat = "optimizer_state_dict" in common  # a ZeRO-3 source
    if flat:
        step = _adam_step(folder, common["optimizer_state_dict"]["state"].get(0, {}).get("step"))
        shapes = _param_shapes(folder)
        for param_dir in glob.glob(os.path.join(zero, "*", "")):
            name = os.path.basename(os.path.dirname(param_dir))
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                path = os.path.join(param_dir, f"{key}.pt")
                tensor = _load(path)
                if isinstance(tensor, torch.Tensor):
                    torch.save({"param": tensor.view(shapes[name]), "cat_dim": 0}, path)
            torch.save(step, os.path.join(param_dir, "step.pt"))
    else:
        steps = glob.glob(os.path.join(zero, "*", "step.pt"))
        step = _adam_step(folder, _load(steps[0]) if steps else None)
    import deepspeed

    common.pop("fp32_flat_groups", None)
    common["optimizer_state_dict"] = {
        "state": {0: {"step": step}},
        "param_groups": common["param_groups"],
    }
    common.setdefault("ds_version", deepspeed.__version__)
    torch.save(common, common_path)
    present = [n for n in MODEL_STATES if os.path.isfile(os.path.join(folder, n))]
    if not present:
        raise UserError(f"{folder}: DeepSpeed's converter wrote no model-states file.")
    source = os.path.join(folder, present[0])
    if not flat:
        # A ZeRO-1/2 model-states file also holds the whole model, which a universal load
        # never reads (weights come from zero/) but every rank would torch.load.
        states = _load(source)
        states["module"] = {}
        torch.save(states, source)
    for name in MODEL_STATES:
        if name not in present:
            _link_or_copy(source, os.path.join(folder, name))


def _load(path: str):
    """A DeepSpeed checkpoint file, unpickled without running code (weights_only): tensors,
    plain containers and the few DeepSpeed classes its optimizer states hold, nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, weights_only=True)


def _adam_step(folder: str, step):
    if step is None:  # an optimizer that keeps no per-parameter step (not DeepSpeed's Adams)
        raise UserError(
            f"{folder}: the checkpoint's optimizer state has no Adam step count, which a "
            "universal checkpoint needs; resume with the ranks and ZeRO stage that wrote it."
        )
    return step


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, target)


def _param_shapes(folder: str) -> dict[str, torch.Size]:
    states = _load(os.path.join(folder, MODEL_STATES[1]))
    return {name: shape for group in states["param_shapes"] for name, shape in group.items()}


def restore_param_groups(engine, universal: str) -> None:
    """Give every optimizer param group its own saved hyperparameters back (ZeRO-3 loads
    copy group 0's onto all; at ZeRO-1/2 this changes nothing)."""
    saved = _load(os.path.join(universal, "zero", "optimizer_state.pt"))
    optimizer = engine.optimizer
    while hasattr(optimizer, "optimizer"):  # ZeRO wrappers hold the real optimizer inside
        optimizer = optimizer.optimizer
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise UserError(
            f"{universal} has {len(saved['param_groups'])} optimizer param groups, this run "
            f"{len(optimizer.param_groups)}: resume with the weight-decay and LoRA flags it was "
            "trained with."
        )
    for group, own in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        group.update({k: v for k, v in own.items() if k != "params"})


def _is_converted(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER))


def _remove_stale_temps(parent: str, name: str) -> None:
    """Temporary folders of conversions killed before their rename."""
    for path in glob.glob(os.path.join(parent, f".{name}.tmp-*")):
        pid = path.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
