"""Running main.py in subprocesses for the checkpoint tests: commands, logs, weights."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import REPO, child_env

# 34 rows, micro-batch 2, accumulation 2: 17 micro-batches per epoch, so 9 optimizer steps
# per epoch (the last one over a single micro-batch) and 18 in all.
TRAIN_FLAGS = [
    "--data_split", "10,0,0",
    "--per_device_train_batch_size", "2",
    "--gradient_accumulation_steps", "2",
    "--num_train_epochs", "2",
    "--max_seq_len", "32",
    "--learning_rate", "3e-3",
    "--print_loss",
    "--save_steps", "3",
    "--save_total_limit", "2",
]  # fmt: skip
TOTAL_STEPS = 18
STEP_LINE = re.compile(r"step (\d+)/\d+ loss (\S+)")
RESUMED = re.compile(r"resumed from \S*checkpoint-(\d+)")


def write_data(path: Path, train_rows: int = 34) -> Path:
    """34 (or `train_rows`) train and 4 eval rows of (prompt, chosen) jsonl."""
    for name, count in (("train", train_rows), ("eval", 4)):
        with open(path / f"{name}.jsonl", "w") as f:
            for i in range(count):
                row = {
                    "prompt": f" Human: What is {i} plus {i}?",
                    "chosen": f" {i} plus {i} is {2 * i}.",
                }
                f.write(json.dumps(row) + "\n")
    return path


def main_command(model_dir, data_dir, out, *extra) -> list[str]:
    return [
        sys.executable, "main.py",
        "--model_name_or_path", str(model_dir),
        "--data_path", str(data_dir),
        "--data_output_path", str(Path(data_dir).parent / "cache"),
        "--output_dir", str(out),
        *TRAIN_FLAGS, *extra,
    ]  # fmt: skip


def run_env(**extra: str) -> dict[str, str]:
    # One thread: the same kernels in every run, so fp32 results are reproducible bit for bit.
    return child_env(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)


def run_to_end(command: list[str], **env: str) -> str:
    done = subprocess.run(
        command, cwd=REPO, env=run_env(**env), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def start(command: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=run_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: signals reach the whole tree
    )


def read_until(proc: subprocess.Popen, pattern: str) -> str:
    """Stdout up to and including the first line matching `pattern`."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
    proc.wait()
    raise AssertionError(f"the run ended without printing {pattern!r}:\n{''.join(seen)[-3000:]}")


def losses(log: str) -> dict[int, str]:
    return {int(step): loss for step, loss in STEP_LINE.findall(log)}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def train_metrics(out: Path) -> dict[int, tuple]:
    """Step -> (loss, lr, grad_norm) at full precision, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        r["step"]: (r["loss"], r["lr"], r.get("grad_norm")) for r in rows if r["type"] == "train"
    }
