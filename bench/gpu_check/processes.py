"""Child processes of the GPU check: each bounded in time, its output kept in a log, and
one that will not exit is caught, its Python stacks recorded, then killed.

A run that printed its end marker (main.py's "verified ..." line) and then stays silent
for `grace_s` is hung at exit: that is how the single-GPU launcher failed on an H200 (its
main process waited in multiprocessing's exit handler for DataLoader workers). Stacks come
from py-spy where it is installed, and from faulthandler in any case: every child runs with
PYTHONFAULTHANDLER=1, so SIGABRT makes each Python process print all its threads' stacks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

RUNNING: set[subprocess.Popen] = set()  # children not yet waited for (`stop_running`)
STACK_PAUSE_S = 0.5  # between two processes' stack dumps
STACKS_WAIT_S = 2.0  # for faulthandler's output to reach the log after SIGABRT


@dataclass
class Outcome:
    """How a child process ended, in wall-clock seconds from its launch."""

    returncode: int | None  # None: killed by us (timed out or hung)
    wall_s: float
    timed_out: bool = False
    hung: bool = False  # printed its end marker, then neither exited nor printed for grace_s
    end_marker_s: float | None = None  # when the end marker was printed
    exit_after_last_line_s: float | None = None  # None: killed; see `run` for "last line"
    lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.hung


def run(
    command: list[str],
    log_path: str,
    timeout_s: float,
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    end_marker: str | None = None,
    grace_s: float = 30.0,
    epilogue: tuple[str, ...] = (),
) -> Outcome:
    """Run `command` with stdout and stderr into `log_path`; kill it after `timeout_s`, or
    `grace_s` after it printed a line starting with `end_marker` if it neither exits nor
    prints again. The last line is the last one not starting with an `epilogue` prefix
    (lines a wrapper prints once its child has exited)."""
    env = {**(env or os.environ), "PYTHONFAULTHANDLER": "1", "PYTHONUNBUFFERED": "1"}
    began = time.monotonic()
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,  # its own process group, killed as one
    )
    RUNNING.add(child)
    seen: list[tuple[float, str]] = []
    with open(log_path, "a", encoding="utf-8", errors="replace") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        reader = threading.Thread(target=_read, args=(child.stdout, log, seen), daemon=True)
        reader.start()
        try:
            outcome = _wait(child, began, timeout_s, end_marker, grace_s, seen)
        except BaseException:  # the check itself was stopped: leave nothing running
            _kill_all(child)
            raise
        if outcome.returncode is None:
            dump_stacks(child.pid, log)
        _kill_all(child)  # after an exit too: what it left behind in its group
        RUNNING.discard(child)
        reader.join(timeout=10)
        log.write(f"# {describe(outcome)}\n")
    outcome.lines = [line for _, line in seen]
    ended = began + outcome.wall_s
    last = [t for t, line in seen if not (epilogue and line.startswith(epilogue))]
    if outcome.returncode is not None and last:
        outcome.exit_after_last_line_s = ended - last[-1]
    return outcome


def _read(stream, log, seen: list[tuple[float, str]]) -> None:
    for raw in stream:
        line = raw.decode("utf-8", "replace")
        seen.append((time.monotonic(), line.rstrip("\n")))
        log.write(line)
        log.flush()


def _wait(child, began, timeout_s, end_marker, grace_s, seen) -> Outcome:
    while True:
        try:
            code = child.wait(timeout=0.2)
            return Outcome(
                code, time.monotonic() - began, end_marker_s=_marker(seen, end_marker, began)
            )
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        marker = _marker(seen, end_marker, began)
        if marker is not None and now - max(began + marker, seen[-1][0]) > grace_s:
            return Outcome(None, now - began, hung=True, end_marker_s=marker)
        if now - began > timeout_s:
            return Outcome(None, now - began, timed_out=True, end_marker_s=marker)


def _marker(seen, end_marker: str | None, began: float) -> float | None:
    if end_marker is None:
        return None
    hits = [t for t, line in list(seen) if line.startswith(end_marker)]
    return hits[0] - began if hits else None


def dump_stacks(pid: int, log) -> None:
    """Every Python process from `pid` down: py-spy's dump where installed, then
    faulthandler's (SIGABRT; the children run with PYTHONFAULTHANDLER=1)."""
    pythons = [p for p, program in descendants(pid) if program.startswith("python")]
    log.write(f"# stacks of the Python processes {pythons} (py-spy, then faulthandler)\n")
    log.flush()
    py_spy = shutil.which("py-spy")
    for p in pythons if py_spy else ():
        done = subprocess.run(
            [py_spy, "dump", "--pid", str(p)], capture_output=True, text=True, timeout=30
        )
        log.write(done.stdout + done.stderr)
    log.flush()
    for p in pythons:  # one at a time, so that their stacks do not interleave in the log
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGABRT)
        time.sleep(STACK_PAUSE_S)
    time.sleep(STACKS_WAIT_S)


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, program name) of `pid` and every process below it, read from /proc: a launcher's
    children may start process groups or sessions of their own."""
    parents, programs = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                program = f.read().split(b"\0")[0].decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        programs[int(name)] = os.path.basename(program)
    found, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return [(p, programs.get(p, "")) for p in found]


def stop_running() -> None:
    """Kill every child still running (its thread was abandoned when the check stopped):
    children run in sessions of their own, so nothing else would end them."""
    for child in list(RUNNING):
        _kill_all(child)


def _kill_all(child: subprocess.Popen) -> None:
    for pid, _ in reversed(descendants(child.pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    RUNNING.discard(child)


def describe(outcome: Outcome) -> str:
    if outcome.hung:
        return (
            f"hung: printed its end marker at {outcome.end_marker_s:.1f} s, then neither "
            f"exited nor printed; killed at {outcome.wall_s:.1f} s"
        )
    if outcome.timed_out:
        return f"timed out: killed at {outcome.wall_s:.1f} s"
    return f"exit code {outcome.returncode} after {outcome.wall_s:.1f} s"
