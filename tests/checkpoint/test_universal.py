"""Elastic resume: `python main.py` continues a checkpoint written by 2 ranks at ZeRO-2 on 1
rank, at ZeRO-3 and at ZeRO-2, through DeepSpeed's universal checkpoint.

One 2-rank source run (32 rows, micro-batch 2, accumulation 2: 8 rows per step, 4 steps
per epoch, checkpoints at steps 3, 4, 6 and 8) serves both resumes; each keeps the global
batch, as a resume must, so the schedule is the same:
- 1 rank at ZeRO-3 with micro-batch 4 keeps the rows per micro-step (4): the data order
  continues exactly, so every later step's loss and the final weights must be the source
  run's to float rounding (this also catches ZeRO-3 loading every param group with group
  0's weight decay);
- 1 rank at ZeRO-2 with micro-batch 2 and accumulation 4 halves the rows per micro-step:
  the interrupted epoch's remaining rows are replayed in the source's order, so each step
  still trains the rows the source's step did, and its loss must match too.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.checkpoint_runs import REPO, TRAIN_FLAGS, run_env, train_metrics, weights, write_data
from utils.checkpoint.checks import RUN_STATE, RunShape, published_checkpoints
from utils.checkpoint.universal import MARKER, convert_to_universal, needs_conversion, universal_dir
from utils.errors import UserError

pytestmark = pytest.mark.slow
TOTAL_STEPS = 8


def flags(model_dir, data_dir, out, stage: int, micro: int, accumulation: int) -> list[str]:
    geometry = ["--zero_stage", str(stage), "--per_device_train_batch_size", str(micro)]
    return [
        "--model_name_or_path", str(model_dir),
        "--data_path", str(data_dir),
        "--data_output_path", str(data_dir.parent / "cache"),
        "--output_dir", str(out),
        *TRAIN_FLAGS, "--save_total_limit", "4", "--weight_decay", "0.1", *geometry,
        "--gradient_accumulation_steps", str(accumulation),
    ]  # fmt: skip


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run(command: list[str]) -> str:
    done = subprocess.run(
        command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_model_dir) -> dict:
    """An uninterrupted 2-rank ZeRO-2 run of main.py, checkpointing every 3 steps."""
    data_dir = write_data(tmp_path_factory.mktemp("data"), train_rows=32)
    out = tmp_path_factory.mktemp("two-ranks")
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", free_port()]
    run([*launcher, "--num_gpus", "2", "main.py", *flags(tiny_model_dir, data_dir, out, 2, 2, 2)])
    checkpoints = dict(published_checkpoints(str(out)))
    assert sorted(checkpoints) == [3, 4, 6, 8]
    return {"out": out, "data_dir": data_dir, "checkpoints": checkpoints}


def resume(tmp_path, model_dir, source, checkpoint: str, stage, micro, accumulation):
    out = tmp_path / "out"
    main_flags = flags(model_dir, source["data_dir"], out, stage, micro, accumulation)
    log = run([sys.executable, "main.py", *main_flags, "--resume_from_checkpoint", checkpoint])
    return out, log


def assert_continues(out: Path, source: dict, after: int, rel: float, atol: float) -> None:
    expected, resumed = train_metrics(source["out"]), train_metrics(out)
    assert sorted(resumed) == list(range(after + 1, TOTAL_STEPS + 1))
    for step, (loss, lr, _) in resumed.items():
        assert loss == pytest.approx(expected[step][0], rel=rel), step
        assert lr == pytest.approx(expected[step][1], rel=1e-6), step  # the same schedule
    final, reference = weights(out), weights(source["out"])
    for name, tensor in final.items():
        if name.endswith("k_proj.bias"):
            # Its true gradient is zero (softmax ignores a shift shared by all keys), so Adam
            # turns the rounding noise of another reduction order into updates of ~1e-6.
            continue
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=atol, msg=name)


def test_two_ranks_at_zero2_continue_on_one_rank_at_zero3(tmp_path, tiny_model_dir, source):
    checkpoint = tmp_path / "checkpoint-3"  # mid-epoch 1: 3 of its 4 steps trained
    shutil.copytree(source["checkpoints"][3], checkpoint)
    out, log = resume(tmp_path, tiny_model_dir, source, str(checkpoint), 3, 4, 2)
    assert "2 ranks at ZeRO stage 2 -> 1 rank at ZeRO stage 3" in log
    assert re.search(r"resumed from \S*checkpoint-3: step 3, epoch 1, 24 rows into it", log)
    assert_continues(out, source, after=3, rel=1e-5, atol=1e-6)
    state = json.loads((out / "checkpoint-6" / RUN_STATE).read_text())
    assert (state["shape"]["world_size"], state["shape"]["zero_stage"]) == (1, 3)
    assert state["position"] == {"epoch": 1, "rows_done": 16, "order_rows_per_micro_step": 4}


def test_a_converted_checkpoint_continues_with_fewer_rows_per_micro_step(
    tmp_path, tiny_model_dir, source
):
    checkpoint = tmp_path / "checkpoint-6"  # mid-epoch 2: 2 of its 4 steps trained
    shutil.copytree(source["checkpoints"][6], checkpoint)
    stale = checkpoint / ".universal.tmp-999999999"  # a conversion killed before its rename
    stale.mkdir()
    universal = convert_to_universal(str(checkpoint), universal_dir(str(checkpoint)))
    assert not stale.exists()
    assert sorted(p.name for p in checkpoint.iterdir() if p.name.startswith(".")) == []
    converted_at = Path(universal, MARKER).stat().st_mtime_ns

    # A converted checkpoint is accepted as it is (and not converted again).
    out, log = resume(tmp_path, tiny_model_dir, source, universal, 2, 2, 4)
    assert "2 ranks at ZeRO stage 2 -> 1 rank at ZeRO stage 2" in log
    assert "2 x 2 x 2 = 8 -> 2 x 1 x 4 = 8 (the same global batch" in log
    assert Path(universal, MARKER).stat().st_mtime_ns == converted_at
    # The remaining 16 rows in micro-batches of 2 instead of 4: each step the same 8 rows
    # (padded differently: float rounding), so the losses carry on.
    assert_continues(out, source, after=6, rel=1e-5, atol=1e-6)

    Path(universal, MARKER).unlink()  # a folder this module did not finish is never trusted
    with pytest.raises(UserError, match=r"not a complete conversion.*delete it"):
        convert_to_universal(str(checkpoint), universal)


def test_a_zero0_checkpoint_is_not_converted(tmp_path, source):
    checkpoint = tmp_path / "checkpoint-0"
    shutil.copytree(source["checkpoints"][6], checkpoint)
    for path in checkpoint.glob("zero_pp_rank_*"):  # what a ZeRO-0 checkpoint lacks
        path.unlink()
    target = universal_dir(str(checkpoint))
    with pytest.raises(UserError, match=r"ZeRO stage 0.*--zero_stage 0"):
        convert_to_universal(str(checkpoint), target)
    assert [p.name for p in checkpoint.iterdir() if "universal" in p.name] == []


@pytest.mark.parametrize(
    ("saved", "current", "expected"),
    [
        ((2, 2), (2, 2), False),
        ((2, 2), (1, 2), True),  # another world size
        ((2, 2), (2, 3), True),  # another ZeRO stage
        ((2, 0), (1, 0), False),  # ZeRO-0 state is whole on every rank
    ],
)
def test_needs_conversion(saved, current, expected):
    shape = lambda ws, stage: RunShape(world_size=ws, zero_stage=stage, param_shapes={})  # noqa: E731
    assert needs_conversion(shape(*saved), shape(*current)) is expected


def test_moving_to_or_from_zero0_is_refused_with_the_stage_to_use():
    shape = lambda ws, stage: RunShape(world_size=ws, zero_stage=stage, param_shapes={})  # noqa: E731
    with pytest.raises(UserError, match=r"2 ranks at ZeRO stage 0.*--zero_stage 0"):
        needs_conversion(shape(2, 0), shape(1, 2))
    with pytest.raises(UserError, match=r"--zero_stage 2"):
        needs_conversion(shape(2, 2), shape(2, 0))
