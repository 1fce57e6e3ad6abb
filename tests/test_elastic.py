"""Elastic resume: a checkpoint written by 2 ranks at ZeRO-2 continues on 1 rank at ZeRO-2
and at ZeRO-3 through DeepSpeed's universal checkpoint (utils/engine/elastic.py).

The resumed run keeps the rows per micro-step (1 x 4 = 2 x 2) and per optimizer step, so
it sees the same batches and learning rates, and its losses must continue the 2-rank
run's to float rounding.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_runs import REPO, TRAIN_FLAGS, run_env, train_metrics, weights, write_data

from utils.engine.checkpoint import published_checkpoints
from utils.engine.checkpoint_checks import RUN_STATE, RunShape
from utils.engine.elastic import MARKER, convert_to_universal, needs_conversion, universal_dir
from utils.errors import UserError

pytestmark = pytest.mark.slow
RESUME_STEP = 6  # mid-epoch 2: 3 of its 9 micro-batches trained


def flags(model_dir, data_dir, out, stage: int, micro: int) -> list[str]:
    geometry = ["--zero_stage", str(stage), "--per_device_train_batch_size", str(micro)]
    return [
        "--model_name_or_path", str(model_dir),
        "--data_path", str(data_dir),
        "--data_output_path", str(data_dir.parent / "cache"),
        "--output_dir", str(out),
        *TRAIN_FLAGS, "--save_total_limit", "3", "--weight_decay", "0.1", *geometry,
    ]  # fmt: skip


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run(command: list[str]) -> None:
    env = run_env(PYTHONPATH=str(REPO))  # tests/elastic_worker.py imports main and utils
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_model_dir) -> dict:
    """An uninterrupted 2-rank ZeRO-2 run of main.py, checkpointing every 3 steps."""
    data_dir = write_data(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("two-ranks")
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", free_port()]
    run([*launcher, "--num_gpus", "2", "main.py", *flags(tiny_model_dir, data_dir, out, 2, 2)])
    checkpoint = dict(published_checkpoints(str(out)))[RESUME_STEP]
    return {"out": out, "data_dir": data_dir, "checkpoint": Path(checkpoint)}


@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_zero2_checkpoint_continues_on_one_rank(
    tmp_path, tiny_model_dir, two_ranks, stage
):
    checkpoint = tmp_path / f"checkpoint-{RESUME_STEP}"
    shutil.copytree(two_ranks["checkpoint"], checkpoint)
    universal = convert_to_universal(str(checkpoint), universal_dir(str(checkpoint)))
    shutil.copy(checkpoint / RUN_STATE, universal)  # the resume path finds run_state.json there
    ds_config = tmp_path / "ds_config.json"
    ds_config.write_text(json.dumps({"checkpoint": {"load_universal": True}}))
    out, report = tmp_path / "out", tmp_path / "report.json"
    main_flags = flags(tiny_model_dir, two_ranks["data_dir"], out, stage, micro=4)
    worker = [sys.executable, "tests/elastic_worker.py", universal, str(checkpoint), str(report)]
    run([*worker, *main_flags, "--deepspeed_config", str(ds_config)])

    loaded = json.loads(report.read_text())
    assert loaded["compared"] > 0 and loaded["differing"] == []  # the saved fp32 weights, exactly
    assert loaded["global_steps"] == RESUME_STEP
    assert sorted(loaded["weight_decay"]) == [0.0, 0.1]  # ZeRO-3 loads copy one group's onto all
    expected = train_metrics(two_ranks["out"])
    resumed = train_metrics(out)
    assert sorted(resumed) == [s for s in sorted(expected) if s > RESUME_STEP]
    for step, (loss, lr, grad_norm) in resumed.items():
        assert loss == pytest.approx(expected[step][0], rel=1e-5), step
        assert lr == pytest.approx(expected[step][1], rel=1e-6), step
        assert grad_norm == pytest.approx(expected[step][2], rel=1e-4), step
    final, reference = weights(out), weights(two_ranks["out"])
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6, msg=name)


def test_conversion_is_atomic_and_done_once(tmp_path, two_ranks):
    checkpoint = tmp_path / f"checkpoint-{RESUME_STEP}"
    shutil.copytree(two_ranks["checkpoint"], checkpoint)
    target = universal_dir(str(checkpoint))
    stale = checkpoint / ".universal.tmp-999999999"  # a conversion killed before its rename
    stale.mkdir()
    assert convert_to_universal(str(checkpoint), target) == target
    assert not stale.exists()
    assert sorted(p.name for p in checkpoint.iterdir() if p.name.startswith(".")) == []
    marker = Path(target, MARKER)
    written = marker.stat().st_mtime_ns
    convert_to_universal(str(checkpoint), target)  # already there: reused, not redone
    assert marker.stat().st_mtime_ns == written

    marker.unlink()  # a folder this module did not finish is never trusted
    with pytest.raises(UserError, match=r"not a complete conversion.*delete it"):
        convert_to_universal(str(checkpoint), target)


def test_a_zero0_checkpoint_is_not_converted(tmp_path, two_ranks):
    checkpoint = tmp_path / "checkpoint-0"
    shutil.copytree(two_ranks["checkpoint"], checkpoint)
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
