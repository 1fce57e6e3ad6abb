"""The Slurm launcher (training_scripts/slurm/): the sbatch script's srun line, the per-node
script's messages and requeue, and two "nodes" of this machine joining one DeepSpeed run.

Slurm itself is absent: its variables are set by hand and stand-ins for `scontrol` and
`srun` on PATH record how they were called.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

SLURM_DIR = REPO / "training_scripts" / "slurm"
NODES = ["127.0.0.1", "localhost"]  # two names for this machine, the first is the master
RECORDER = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$FAKE_SLURM_LOG"
if [[ $1 == show && $2 == hostnames ]]; then printf '%s\\n' {nodes}; fi
"""
# Anything a test process inherits that would steer the scripts or the ranks.
STEERING = {"MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "HOSTFILE", "RANK", "WORLD_SIZE",
            "LOCAL_RANK", "SFT_RECIPE", "GPUS_PER_NODE"}  # fmt: skip


@pytest.fixture
def slurm_env(tmp_path) -> dict[str, str]:
    """A job's environment on node 0 of 2, with `scontrol` and `srun` stand-ins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).write_text(RECORDER.format(nodes=" ".join(NODES)))
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in STEERING and not k.startswith("SLURM")}
    return env | {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_SLURM_LOG": str(tmp_path / "slurm.log"),
        "TMPDIR": str(tmp_path / "tmp"),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[0-1]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "0",
        "SLURM_GPUS_ON_NODE": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture
def tiny_data_dir(tmp_path) -> Path:
    row = {"prompt": " Human: What is 2 plus 3? Assistant:", "chosen": " 2 plus 3 is 5."}
    data = tmp_path / "data"
    data.mkdir()
    for name, count in (("train.jsonl", 16), ("eval.jsonl", 4)):
        (data / name).write_text((json.dumps(row) + "\n") * count)
    return data


def slurm_calls(env: dict[str, str]) -> list[str]:
    path = Path(env["FAKE_SLURM_LOG"])
    return path.read_text().splitlines() if path.exists() else []


def bash(script: str, args: list[str], env: dict[str, str], cwd: Path, **kwargs):
    return subprocess.run(
        ["bash", str(SLURM_DIR / script), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=kwargs.pop("timeout", 60),
        **kwargs,
    )


def test_sbatch_starts_one_node_script_per_node_with_the_launcher_arguments(tmp_path, slurm_env):
    env = slurm_env | {"SLURM_SUBMIT_DIR": str(REPO), "SLURM_CPUS_PER_TASK": "16"}
    done = bash("sbatch_multi_node.sh", ["out", "2", "--dry_run"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    (srun,) = slurm_calls(env)
    assert srun == (
        "srun --nodes 2 --ntasks-per-node 1 --kill-on-bad-exit=1 --cpus-per-task 16 "
        f"bash {SLURM_DIR}/node.sh out 2 --dry_run"
    )


def test_sbatch_outside_a_job_or_the_repository_says_what_to_do(tmp_path, slurm_env):
    outside = {k: v for k, v in slurm_env.items() if k != "SLURM_JOB_ID"}
    done = bash("sbatch_multi_node.sh", [], outside, tmp_path)
    assert done.returncode == 2 and "submit this script with sbatch" in done.stderr
    env = slurm_env | {"SLURM_SUBMIT_DIR": str(tmp_path)}  # submitted from elsewhere
    done = bash("sbatch_multi_node.sh", [], env, tmp_path)
    assert (
        done.returncode == 2 and "submit from the repository root, or set SFT_REPO" in done.stderr
    )
    assert slurm_calls(env) == []  # nothing was started


@pytest.mark.parametrize(
    ("unset", "message"),
    [
        ("SLURM_NODEID", "SLURM_NODEID is not set: run this under srun inside a Slurm job"),
        ("SLURM_GPUS_ON_NODE", "cannot tell how many GPUs this node has"),
    ],
)
def test_node_script_without_slurm_variables_names_the_missing_one(
    tmp_path, slurm_env, unset, message
):
    env = {k: v for k, v in slurm_env.items() if k != unset}
    done = bash("node.sh", [str(tmp_path / "out")], env, tmp_path)
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_single_node_recipe_is_refused(tmp_path, slurm_env):
    env = slurm_env | {"SFT_RECIPE": str(REPO / "training_scripts/opt/single_node/run_1.3b.sh")}
    done = bash("node.sh", [str(tmp_path / "out")], env, tmp_path)
    assert done.returncode == 2 and "is not a multi-node launcher" in done.stderr


@pytest.mark.parametrize(("node", "requeued"), [("0", True), ("1", False)])
def test_a_preempted_run_requeues_the_job_once(tmp_path, slurm_env, node, requeued):
    recipe = tmp_path / "recipe.sh"  # stands in for a launcher whose run exits 75 (preempted)
    recipe.write_text('multi_node_launcher() { :; }\necho "recipe $*"\nexit 75\n')
    env = slurm_env | {"SFT_RECIPE": str(recipe), "SLURM_NODEID": node}
    done = bash("node.sh", ["out", "2", "--max_steps", "3"], env, tmp_path)
    assert done.returncode == 75
    assert "recipe out 2 --resume_from_checkpoint auto --max_steps 3" in done.stdout
    assert ("scontrol requeue 4242" in slurm_calls(env)) is requeued


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.slow
def test_two_nodes_join_one_run_and_each_keeps_its_log(
    tmp_path, slurm_env, tiny_model_dir, tiny_data_dir
):
    """node.sh once per "node", as srun starts it: one DeepSpeed run of 2 ranks (--dry_run)."""
    output = tmp_path / "out"  # shared by both nodes, as on a cluster file system
    args = [str(output), "2", "--model_name_or_path", str(tiny_model_dir)]
    args += ["--data_path", str(tiny_data_dir), "--data_split", "10,0,0", "--max_seq_len", "32"]
    args += ["--per_device_train_batch_size", "4", "--data_output_path", str(tmp_path / "cache")]
    args += ["--dry_run"]
    env = slurm_env | {"MASTER_PORT": free_port()}
    command = ["bash", str(SLURM_DIR / "node.sh"), *args]
    node1 = subprocess.Popen(
        command,
        env=env | {"SLURM_NODEID": "1"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        node0 = bash("node.sh", args, env, tmp_path, timeout=300)
        node1_out, _ = node1.communicate(timeout=120)
    finally:
        node1.kill()
    assert node0.returncode == 0, node0.stdout[-3000:] + node0.stderr[-3000:]
    assert node1.returncode == 0, node1_out[-3000:]

    log0 = (output / "training.log").read_text()
    log1 = (output / "training.node1.log").read_text()
    assert "--node_rank 0 --master_addr 127.0.0.1" in log0
    assert "--node_rank 1 --master_addr 127.0.0.1" in log1
    assert log0.count("run summary") == 1 and "run summary" not in log1  # rank 0 prints
    assert "batch        4 sequences per device x 2 ranks" in log0  # both nodes' ranks in one group
    summary = json.loads(next(line for line in log0.splitlines() if line.startswith('{"train')))
    assert summary["deepspeed_config"]["train_batch_size"] == 8
    assert slurm_calls(env).count("scontrol show hostnames node[0-1]") == 2
    assert list((tmp_path / "tmp").iterdir()) == []  # the hostfiles are cleaned up
