"""A DeepSpeed op build lock left by a killed build is named, not waited on forever."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.checkpoint_runs import REPO, run_env
from utils.engine.build_lock import check_build_lock

# What main.py's build_engine does first: build the optimizer, which loads DeepSpeed's op.
BUILD_OPTIMIZER = """
import torch
from utils.engine.config import TrainConfig
from utils.engine.ds_config import EngineSetup
from utils.engine.optim import build_optimizer
params = [{"params": [torch.nn.Parameter(torch.zeros(4))], "weight_decay": 0.0}]
build_optimizer(params, TrainConfig(), EngineSetup(config={}, dtype_reason="fp32"), "cpu")
"""


def killed_build_lock(extensions_dir, op_name: str = "cpu_adam") -> str:
    """The lock a build killed an hour ago left in the op's build folder."""
    folder = extensions_dir / op_name
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    return str(lock)


def test_a_killed_builds_lock_fails_the_optimizer_build_with_its_path(tmp_path):
    lock = killed_build_lock(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", BUILD_OPTIMIZER],
        cwd=REPO,
        env=run_env(TORCH_EXTENSIONS_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=300,  # torch.utils.cpp_extension alone waits for the lock forever
    )
    assert done.returncode != 0
    assert f"rm {lock}" in done.stderr, done.stderr[-3000:]
    assert os.path.exists(lock)  # named, never deleted: another machine may be building


def test_a_lock_a_living_build_holds_is_left_to_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = killed_build_lock(tmp_path)
    with open(lock):  # this process stands for the builder, which keeps its lock open
        check_build_lock("cpu_adam")  # returns: torch waits for the build to finish
