"""The launch scripts: syntax, shellcheck, every script's command line through main.py's
--dry_run with a tiny model, failure messages, and a two-node ZeRO-3 run on this machine.

Most tests put a stand-in `deepspeed` first on PATH that records its arguments, so each
script's own logic (arguments, log file, messages) runs for real and the recorded
main.py command lines are then dry-run in one Python process (one import of DeepSpeed,
not one per script). The two-node test uses DeepSpeed's real launcher.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO

SCRIPTS_DIR = REPO / "training_scripts"
# run_tiny.sh (the embedded demo) builds its own model and runs prompt_eval.py; it is tested
# with the foundation. Every other launcher takes a model and data through extra flags.
SCRIPTS = sorted(
    p.relative_to(SCRIPTS_DIR).as_posix()
    for p in SCRIPTS_DIR.rglob("run_*.sh")
    if p.name != "run_tiny.sh"
)
SHELL_FILES = sorted(p.relative_to(SCRIPTS_DIR).as_posix() for p in SCRIPTS_DIR.rglob("*.sh"))
FAKE_DEEPSPEED = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$FAKE_DEEPSPEED_ARGS"
echo "fake deepspeed: $# arguments"
if [[ -n ${FAKE_DEEPSPEED_OUTPUT:-} ]]; then echo "$FAKE_DEEPSPEED_OUTPUT"; fi
exit "${FAKE_DEEPSPEED_EXIT:-0}"
"""
EXPECTED = {  # the scripts the issue asks for, so a missing one fails here
    "opt/single_gpu/run_1.3b.sh",
    "opt/single_gpu/run_6.7b_lora.sh",
    "opt/single_node/run_1.3b.sh",
    "opt/single_node/run_1.3b_lora.sh",
    "opt/single_node/run_6.7b.sh",
    "opt/single_node/run_13b.sh",
    "opt/single_node/run_30b_lora.sh",
    "opt/multi_node/run_66b.sh",
    "llama2/run_llama2_7b.sh",
    "llama2/run_llama2_7b_lora.sh",
    "other_language/run_chinese.sh",
    "other_language/run_japanese.sh",
}


def test_every_launcher_in_the_issue_exists():
    assert set(SCRIPTS) >= EXPECTED


@pytest.mark.parametrize("script", SHELL_FILES)
def test_script_is_valid_bash_and_shellcheck_clean(script):
    path = SCRIPTS_DIR / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    result = subprocess.run([shellcheck, str(path)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout


@pytest.fixture
def tiny_data_dir(tmp_path):
    rows = [
        {"prompt": " Human: What is the capital of France? Assistant:", "chosen": " Paris."},
        {"prompt": " Human: What is 2 plus 3? Assistant:", "chosen": " 2 plus 3 is 5."},
        {"prompt": " Human: Say hello. Assistant:", "chosen": " Hello! How can I help you?"},
        {"prompt": " Human: Name a color of the sky. Assistant:", "chosen": " The sky is blue."},
    ] * 10
    data = tmp_path / "data"
    data.mkdir()
    for name, part in (("train.jsonl", rows[:32]), ("eval.jsonl", rows[32:])):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return data


@pytest.fixture
def fake_deepspeed(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "deepspeed").write_text(FAKE_DEEPSPEED)
    (bin_dir / "deepspeed").chmod(0o755)
    return bin_dir


def run_script(script, args, env_extra, cwd, timeout=120):
    env = {**os.environ, **env_extra}
    return subprocess.run(
        ["bash", str(SCRIPTS_DIR / script), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def recorded_args(path: Path) -> list[str]:
    return path.read_text().split("\0")[:-1]


@pytest.mark.slow
def test_every_script_dry_runs_main_with_a_tiny_model(
    tmp_path, fake_deepspeed, tiny_model_dir, tiny_data_dir
):
    """Each script's full command line, extra flags last, is accepted by main.py --dry_run."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n")
    extra = ["--dry_run", "--model_name_or_path", str(tiny_model_dir), "--data_path"]
    extra += [str(tiny_data_dir), "--data_output_path", str(tmp_path / "cache")]
    argvs = {}
    for i, script in enumerate(SCRIPTS):
        output = tmp_path / f"out{i}"
        args_file = tmp_path / f"args{i}"
        env = {
            "PATH": f"{fake_deepspeed}{os.pathsep}{os.environ['PATH']}",
            "FAKE_DEEPSPEED_ARGS": str(args_file),
            "HOSTFILE": str(hostfile),
        }
        result = run_script(script, [str(output), "", *extra], env, tmp_path)
        assert result.returncode == 0, script + result.stderr
        log = (output / "training.log").read_text()
        assert "fake deepspeed" in log  # the launcher's output is in the log
        assert f"training log: {output}/training.log" in result.stdout
        argv = recorded_args(args_file)
        main_at = next(i for i, a in enumerate(argv) if a.endswith("main.py"))
        assert argv[-len(extra) :] == extra  # extra flags come last, so they win
        argvs[script] = argv[main_at + 1 :]
    validator = (
        "import json, sys\n"
        "import main\n"
        "codes = {name: main.main(argv) for name, argv in json.load(open(sys.argv[1])).items()}\n"
        "print('EXIT CODES ' + json.dumps(codes))\n"
    )
    (tmp_path / "argvs.json").write_text(json.dumps(argvs))
    result = subprocess.run(
        [sys.executable, "-c", validator, str(tmp_path / "argvs.json")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "MASTER_PORT": str(free_port())},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    codes = json.loads(result.stdout.split("EXIT CODES ")[-1])
    assert codes == dict.fromkeys(SCRIPTS, 0), result.stderr[-3000:]
    assert result.stdout.count("run summary") == len(SCRIPTS)


def test_missing_positional_arguments_fail_with_usage(tmp_path, fake_deepspeed):
    env = {"PATH": f"{fake_deepspeed}{os.pathsep}{os.environ['PATH']}"}
    env["FAKE_DEEPSPEED_ARGS"] = str(tmp_path / "args")
    result = run_script("opt/single_node/run_1.3b.sh", ["--dry_run"], env, tmp_path)
    assert result.returncode == 2
    assert "usage: bash" in result.stderr and "[OUTPUT] [ZERO_STAGE" in result.stderr
    assert not (tmp_path / "args").exists()  # nothing was launched


def test_cpu_memory_kill_is_explained(tmp_path, fake_deepspeed):
    env = {
        "PATH": f"{fake_deepspeed}{os.pathsep}{os.environ['PATH']}",
        "FAKE_DEEPSPEED_ARGS": str(tmp_path / "args"),
        "FAKE_DEEPSPEED_OUTPUT": "[ERROR] [launch.py:259:sigkill_handler] [...] exits with "
        "return code = -9",
        "FAKE_DEEPSPEED_EXIT": "247",
    }
    output = tmp_path / "out"
    result = run_script("opt/single_node/run_13b.sh", [str(output)], env, tmp_path)
    assert result.returncode == 247
    assert "lack of CPU memory" in result.stderr and "--zero_stage 3" in result.stderr
    assert f"full log: {output}/training.log" in result.stderr
    assert "lack of CPU memory" in (output / "training.log").read_text()


def test_multi_node_without_hostfile_or_master_addr_says_what_to_set(
    tmp_path, fake_deepspeed, monkeypatch
):
    # An earlier in-process run (main.main) leaves MASTER_ADDR in this process's environment.
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    env = {"PATH": f"{fake_deepspeed}{os.pathsep}{os.environ['PATH']}"}
    env |= {"FAKE_DEEPSPEED_ARGS": str(tmp_path / "args"), "HOSTFILE": str(tmp_path / "none")}
    result = run_script("opt/multi_node/run_66b.sh", [str(tmp_path / "o")], env, tmp_path)
    assert result.returncode == 2 and "set HOSTFILE" in result.stderr
    (tmp_path / "hostfile").write_text("a slots=1\nb slots=1\n")
    env |= {"HOSTFILE": str(tmp_path / "hostfile"), "NODE_RANK": "1"}
    result = run_script("opt/multi_node/run_66b.sh", [str(tmp_path / "o")], env, tmp_path)
    assert result.returncode == 2 and "needs MASTER_ADDR" in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_without_ssh_train_zero3_and_save_one_model(
    tmp_path, tiny_model_dir, tiny_data_dir
):
    """Two launchers, one per "node", as a scheduler would start them (--no_ssh --node_rank)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    output = tmp_path / "out"  # shared by both nodes, as on a cluster file system
    env = {
        **os.environ,
        "HOSTFILE": str(hostfile),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    args = [str(output), "3", "--model_name_or_path", str(tiny_model_dir)]
    args += ["--data_path", str(tiny_data_dir), "--data_split", "10,0,0", "--max_seq_len", "32"]
    args += ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4"]
    args += ["--lora_dim", "0", "--max_steps", "3", "--print_loss"]
    args += ["--data_output_path", str(tmp_path / "cache")]
    command = ["bash", str(SCRIPTS_DIR / "opt/multi_node/run_66b.sh"), *args]
    node1 = subprocess.Popen(
        command,
        env={**env, "NODE_RANK": "1"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        node0 = subprocess.run(
            command,
            env={**env, "NODE_RANK": "0"},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=420,
        )
        node1_out, _ = node1.communicate(timeout=120)
    finally:
        node1.kill()
    assert node0.returncode == 0, node0.stdout[-3000:] + node0.stderr[-3000:]
    assert node1.returncode == 0, node1_out[-3000:]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(output)  # one complete model
    assert model.num_parameters() > 0
    log0 = (output / "training.log").read_text()
    log1 = (output / "training.node1.log").read_text()
    assert log0.count("run summary") == 1 and "run summary" not in log1  # rank 0 only
    assert "batch        4 sequences per device x 2 ranks" in log0
    assert "\r" not in log0 and "\x1b" not in log0  # no progress-bar control characters
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"][-1] == 3
    assert any(r["type"] == "eval" and r["eval_loss"] > 0 for r in rows)
    with Image.open(output / "training_curves.png") as image:
        assert image.format == "PNG" and image.size[0] > 100
