"""Every exit is an exit: a run ends within seconds of its last line and leaves no process.

Whole runs of main.py on a CPU with the GPU's loader forced (--dataloader_num_workers:
worker processes that ignore the scheduler's signals) and TensorBoard and the curves on,
ending at --max_steps, on SIGUSR1 (exit 75), on an error mid-epoch and on Ctrl-C. Each
must exit within QUIET_S of its last output line (a run that hangs is killed and fails
the test) and no process it started may outlive it: every process the run starts
inherits a tag in its environment, so a leftover is found after the run has gone. And
nothing may keep a finished run's frames (its engine, its loaders) alive: drawing the
curves did.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import time
import uuid
import weakref
from pathlib import Path

import psutil
import pytest

from tests.checkpoint_runs import REPO, run_env, write_data
from utils.checkpoint.preemption import PREEMPTED_EXIT
from utils.observe.progress import save_curves

QUIET_S = 30  # the longest a run may go on after its last output line
START_S = 600  # a run that never reaches the line a test waits for (a hang of its own)
TAG = "SFT_EXIT_TEST_TAG"  # read by nothing in the product: it only marks the run's processes
# An error raised by the second optimizer step, without a test hook in the product.
FAIL_MID_EPOCH = """
import runpy, sys
import utils.engine.loop as loop
train_step, calls = loop.train_step, []
def failing_step(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        raise RuntimeError("injected failure mid-epoch")
    return train_step(*args, **kwargs)
loop.train_step = failing_step
sys.argv = ["main.py", *sys.argv[1:]]
runpy.run_path("main.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"))


class Run:
    """main.py in its own session, output to a file, every process it starts tagged."""

    def __init__(self, python_args: list[str], flags: list[str], log: Path) -> None:
        self.tag, self.log, self.seen = uuid.uuid4().hex, log, set()
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, *python_args, *flags],
                cwd=REPO,
                env=run_env(**{TAG: self.tag}),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a process group of its own, as a terminal's job
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, line: str) -> None:
        deadline = time.monotonic() + START_S
        while line not in self.text():
            self._watch()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the run never printed {line!r}:\n{self.text()[-3000:]}")

    def wait_for_exit(self) -> int:
        """The exit status; the run is killed and the test fails if it outlives its last
        output line by QUIET_S."""
        size, last_line = -1, time.monotonic()
        while self.proc.poll() is None:
            if (grown := self.log.stat().st_size) != size:
                size, last_line = grown, time.monotonic()
            elif time.monotonic() - last_line > QUIET_S:
                self.kill()
                pytest.fail(
                    f"still running {QUIET_S} s after its last line:\n{self.text()[-3000:]}"
                )
            self._watch()
        return self.proc.returncode

    def signal(self, signum: int) -> None:
        """Like a scheduler or a terminal: to every process of the run's group."""
        os.killpg(self.proc.pid, signum)

    def workers_seen(self) -> int:
        return sum("spawn_main" in cmdline for cmdline in self.seen)

    def survivors(self) -> list[psutil.Process]:
        """The run's processes still alive once helpers (multiprocessing's resource
        tracker) have had time to see it gone."""
        _, alive = psutil.wait_procs(self._tagged(), timeout=10)
        return alive

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        for process in self._tagged():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        self.proc.wait()

    def _watch(self) -> None:
        time.sleep(0.1)
        for process in self._tagged():
            try:
                self.seen.add(" ".join(process.cmdline()))
            except psutil.NoSuchProcess:
                continue

    def _tagged(self) -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter():
            try:
                if process.environ().get(TAG) == self.tag:
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found


def start(model_dir, data_dir, tmp_path, *extra: str, python_args=("main.py",)) -> Run:
    flags = [
        "--model_name_or_path", str(model_dir),
        "--data_path", str(data_dir),
        "--data_split", "10,0,0",
        "--data_output_path", str(tmp_path / "cache"),
        "--output_dir", str(tmp_path / "out"),
        "--max_seq_len", "32",
        "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2",
        "--print_loss",
        "--enable_tensorboard", "--tensorboard_path", str(tmp_path / "tensorboard"),
        # The GPU's loader on a CPU. One worker costs half of two to start (a fresh
        # interpreter each) and exits the same way.
        "--dataloader_num_workers", "1",
        *extra,
    ]  # fmt: skip
    return Run(list(python_args), flags, tmp_path / "run.log")


def assert_exited_cleanly(run: Run) -> None:
    assert run.workers_seen() >= 1, "the run never started a loader worker: nothing was tested"
    assert "loader       1 worker process (spawn)" in run.text()
    survivors = run.survivors()
    assert not survivors, f"processes outlived the run: {survivors}"
    assert (run.log.parent / "out" / "training_curves.png").is_file()  # the curves were drawn


@pytest.mark.slow
def test_a_run_that_reaches_max_steps_exits_and_leaves_no_process(
    tiny_model_dir, data_dir, tmp_path
):
    run = start(tiny_model_dir, data_dir, tmp_path, "--max_steps", "3")
    run.wait_for("verified ")
    assert run.wait_for_exit() == 0, run.text()[-3000:]
    assert_exited_cleanly(run)


@pytest.mark.slow
def test_a_preempted_run_exits_75_and_leaves_no_process(tiny_model_dir, data_dir, tmp_path):
    run = start(tiny_model_dir, data_dir, tmp_path)
    # As its worker starts (it must not die of the signal meanwhile): the run stops after
    # its first step, long before the epoch ends.
    run.wait_for("Beginning of Epoch")
    run.signal(signal.SIGUSR1)
    run.wait_for("stopping on SIGUSR1")
    assert run.wait_for_exit() == PREEMPTED_EXIT, run.text()[-3000:]
    assert_exited_cleanly(run)


@pytest.mark.slow
def test_an_error_mid_epoch_exits_and_leaves_no_process(tiny_model_dir, data_dir, tmp_path):
    run = start(tiny_model_dir, data_dir, tmp_path, python_args=("-c", FAIL_MID_EPOCH))
    run.wait_for("error: RuntimeError: injected failure mid-epoch")
    assert run.wait_for_exit() == 1, run.text()[-3000:]
    assert_exited_cleanly(run)


@pytest.mark.slow
def test_ctrl_c_mid_epoch_exits_and_leaves_no_process(tiny_model_dir, data_dir, tmp_path):
    run = start(tiny_model_dir, data_dir, tmp_path)
    run.wait_for("step 1/")
    run.signal(signal.SIGINT)
    assert run.wait_for_exit() != 0, run.text()[-3000:]
    assert "KeyboardInterrupt" in run.text()
    assert_exited_cleanly(run)


def test_drawing_the_curves_leaves_no_frame_of_its_callers_alive(tmp_path):
    """matplotlib's tick labels on the log axis go through its mathtext parser, which leaves
    reference cycles holding tracebacks, and so every frame that called it: a run's main()
    with its engine and loaders, until some later garbage collection (perhaps at exit)."""
    from matplotlib.mathtext import MathTextParser

    rows = [{"type": "train", "step": s, "loss": 6.0 - s / 10} for s in range(1, 5)]
    rows += [{"type": "eval", "step": s, "eval_perplexity": 350.0 - 30 * s} for s in (0, 4)]

    class Held:  # stands for what main()'s frame holds
        pass

    def caller() -> weakref.ref:
        held = Held()
        assert save_curves(rows, str(tmp_path / "training_curves.png"))
        return weakref.ref(held)

    MathTextParser._parse_cached.cache_clear()  # parse the labels again, as a new run does
    gc.disable()  # no automatic collection may hide what save_curves leaves behind
    try:
        held = caller()
        assert held() is None
    finally:
        gc.enable()
