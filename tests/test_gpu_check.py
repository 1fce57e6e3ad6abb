"""bench/gpu_check.sh --tiny: the one-shot GPU check keeps working on a CPU."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_tiny_gpu_check_reports_every_run_and_the_ratios():
    env = child_env()  # a group of its own
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--tiny"],
        cwd=REPO,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    found = {}
    for line in lines:
        match = re.match(r"(\w+) +(\d+) real tokens/s .* loss (\d+\.\d+)$", line)
        if match:
            found[match[1]] = float(match[3])
    assert set(found) == {"pad", "default", "packing", "chunked"}
    assert any(line.startswith("varlen") and "skipped" in line for line in lines)
    # Same model, same batches: the chunked loss trains exactly as the plain one.
    assert found["chunked"] == found["default"]
    assert re.fullmatch(
        r"default/pad=\d+\.\d\d packing/pad=\d+\.\d\d varlen/pad=n/a "
        r"chunked/default=\d+\.\d\d chunked_memory/default=n/a",
        lines[-1],
    )
