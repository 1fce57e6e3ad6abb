"""Two ranks under `deepspeed --num_gpus 2` (CPU, ZeRO-2): preempt, resume exactly, refuse misfits.

ZeRO-2 splits the optimizer state between the ranks (one file per rank) and each rank
has its own data shard and RNG streams, so this is where resume can lose per-rank state.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from tests.checkpoint_runs import (
    REPO,
    TRAIN_FLAGS,
    losses,
    read_until,
    run_env,
    start,
    train_metrics,
    weights,
    write_data,
)
from utils.checkpoint.checks import check_files, published_checkpoints, read_run_state
from utils.checkpoint.preemption import PREEMPTED_EXIT
from utils.checkpoint.store import LATEST
from utils.errors import UserError

pytestmark = pytest.mark.slow
TOTAL_STEPS = 10  # 34 rows: 9 micro-batches per rank and epoch, accumulation 2: 5 steps


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def zero2_flags(model_dir, data_dir, out) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir),
        "--data_path", str(data_dir),
        "--data_output_path", str(data_dir.parent / "cache"),
        "--output_dir", str(out),
        "--zero_stage", "2",
        *TRAIN_FLAGS,
    ]  # fmt: skip


def two_rank_command(model_dir, data_dir, out) -> list[str]:
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", free_port()]
    return [*launcher, "--num_gpus", "2", "main.py", *zero2_flags(model_dir, data_dir, out)]


def run_two_ranks(command: list[str]) -> str:
    done = subprocess.run(
        command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def two_rank_baseline(tmp_path_factory, tiny_model_dir, data_dir) -> dict:
    out = tmp_path_factory.mktemp("two-rank-baseline")
    run_two_ranks(two_rank_command(tiny_model_dir, data_dir, out))
    return {"metrics": train_metrics(out), "weights": weights(out), "out": out}


def test_two_ranks_preempted_by_sigterm_resume_exactly(
    tmp_path, tiny_model_dir, data_dir, two_rank_baseline
):
    out = tmp_path / "out"
    command = [*two_rank_command(tiny_model_dir, data_dir, out), "--resume_from_checkpoint", "auto"]
    proc = start(command)
    head = read_until(proc, r"step 2/")
    # What a scheduler does: signal every rank (here at slightly different moments).
    ranks = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "--local_rank=" in " ".join(p.cmdline())
    ]
    assert len(ranks) == 2
    for rank in ranks:
        os.kill(rank.pid, signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT, log[-3000:]
    stopped_at = int(re.search(r"stopping on .+ after step (\d+)", log).group(1))
    assert stopped_at == max(losses(head + log))  # the step under way when the signal came
    assert (out / LATEST).read_text() == f"checkpoint-{stopped_at}"
    files = sorted(os.listdir(out / f"checkpoint-{stopped_at}"))
    assert [f for f in files if f.startswith("zero_pp_rank_")] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]

    log = run_two_ranks(command)
    assert sorted(losses(log)) == list(range(stopped_at + 1, TOTAL_STEPS + 1))
    assert train_metrics(out) == two_rank_baseline["metrics"]
    for name, tensor in weights(out).items():
        assert torch.equal(tensor, two_rank_baseline["weights"][name]), name


def test_a_two_rank_checkpoint_on_one_process_must_keep_the_global_batch(
    tmp_path, tiny_model_dir, data_dir, two_rank_baseline
):
    out = tmp_path / "out"
    shutil.copytree(two_rank_baseline["out"], out)
    command = [
        sys.executable, "main.py", *zero2_flags(tiny_model_dir, data_dir, out),
        "--resume_from_checkpoint", "auto",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300
    )
    # One rank at the same micro-batch would halve the global batch (and so the schedule).
    assert done.returncode == 2, done.stderr[-3000:]
    assert (
        "2 x 2 x 2 = 8 in the checkpoint, 2 x 1 x 2 = 4 now: keep it with "
        "--per_device_train_batch_size 4 --gradient_accumulation_steps 2 on 1 rank"
    ) in done.stderr
    assert "Traceback" not in done.stderr


def test_a_two_rank_checkpoint_missing_one_rank_file_is_refused(tmp_path, two_rank_baseline):
    step, source = published_checkpoints(two_rank_baseline["out"])[-1]
    path = tmp_path / f"checkpoint-{step}"
    shutil.copytree(source, path)
    (path / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(UserError, match=r"zero_pp_rank_1_mp_rank_00_optim_states.pt missing"):
        check_files(str(path), read_run_state(str(path)))
