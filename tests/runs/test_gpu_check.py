"""bench/gpu_check.sh: the one-call GPU check runs on a CPU (--tiny) as it must on a lent
GPU, and catches a run that does not exit after its last line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from bench.gpu_check.processes import run
from tests.conftest import REPO, child_env

RATIO_LINE = (
    r"default/pad=\d+\.\d\d packing/pad=\d+\.\d\d chunked/plain=\d+\.\d\d "
    r"chunked_peak/plain=\d+\.\d\d e2e_s=\d+ launcher_exit_s=\d+\.\d"
)
# Prints main.py's last line, then hangs in multiprocessing's exit handler on a worker
# that never ends: how the single-GPU launcher hung on an H200.
HANGS_AT_EXIT = """
import multiprocessing, time

def wait_forever():
    time.sleep(3600)

if __name__ == "__main__":
    multiprocessing.Process(target=wait_forever).start()
    print("verified /out: ok", flush=True)
"""


@pytest.mark.slow
def test_tiny_check_measures_every_part(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--tiny", "--out", str(out), "--work", str(tmp_path / "w")],
        cwd=REPO,
        env=child_env(OMP_NUM_THREADS="1"),  # a group of its own
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.fullmatch(RATIO_LINE, done.stdout.strip().splitlines()[-1])
    assert sorted(os.listdir(out)) == ["logs.tar.gz", "results.json", "summary.md"]  # <= 8
    results = json.loads((out / "results.json").read_text())

    variants = results["variants"]
    assert list(variants) == ["pad", "default", "packing", "plain"]
    for v in variants.values():
        assert v["status"] == "ok"
        assert v["timed_steps"] == len(v["steps"]) >= 1
        assert v["warmup_steps"] >= max(3, len(v["widths"]))
        assert v["tokens_per_s"] > 0 and v["peak_gib"] > 0
    assert variants["pad"]["widths"] == [128]  # DeepSpeed-Chat's batches: every row padded
    assert len(variants["default"]["widths"]) > 1
    assert variants["default"]["profile"]["by_cpu"]
    # The same batches from the same weights: the chunked loss trains as the plain one does,
    # so their speeds compare equal work.
    chunked = [s["loss"] for s in variants["default"]["steps"]]
    plain = [s["loss"] for s in variants["plain"]["steps"]]
    assert chunked == pytest.approx(plain, rel=1e-4)

    e2e = results["e2e"]
    assert e2e["status"] == "ok" and e2e["verified"]
    assert e2e["eval_loss_after"] < e2e["eval_loss_before"]
    assert e2e["real_tokens_per_s"] > 0 and e2e["steps"] > 0
    launcher = results["launcher"]
    assert launcher["status"] == "ok" and launcher["verified"]
    assert launcher["exit_after_last_line_s"] <= 30


def test_a_run_hung_after_its_last_line_is_killed_with_its_stacks(tmp_path):
    log = tmp_path / "hang.log"
    outcome = run(
        [sys.executable, "-c", HANGS_AT_EXIT],
        str(log),
        timeout_s=120,
        end_marker="verified ",
        grace_s=1,
    )
    assert outcome.hung and outcome.returncode is None and not outcome.ok
    assert outcome.exit_after_last_line_s is None
    text = log.read_text()
    assert "in _exit_function" in text  # the main process, waiting for its worker
    assert "in wait_forever" in text  # the worker


def test_exit_is_timed_from_the_last_line_before_the_wrappers_own(tmp_path):
    script = "import time; print('verified /out', flush=True); time.sleep(1.5)"
    wrapper = f"{sys.executable} -c \"{script}\"; echo 'training log: x'"
    outcome = run(
        ["bash", "-c", wrapper],
        str(tmp_path / "log"),
        timeout_s=120,
        end_marker="verified ",
        epilogue=("training log:",),
    )
    assert outcome.ok and outcome.lines[-1] == "training log: x"
    assert outcome.exit_after_last_line_s >= 1.5
