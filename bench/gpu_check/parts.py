"""The GPU check's parts, each run in processes of its own under a timeout (processes.py):
the inputs, the variants (variant.py), main.py end to end, and the single-GPU launcher."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from bench.gpu_check import inputs as sources
from bench.gpu_check.processes import Outcome, describe, run
from bench.gpu_check.report import write_outputs

VARIANTS = {
    "pad": ["--pad_to_max_len"],
    "default": [],
    "packing": ["--packing"],
    "plain": ["--chunked_loss", "off"],
}
LAUNCHER = "training_scripts/opt/single_gpu/run_1.3b.sh"
END_MARKER = "verified "  # main.py's last line: the saved folder reloads as trained
EPILOGUE = ("fine-tuned model:", "no model saved", "training log:", "metrics:")  # run_logged's
# Each part's timeout in seconds, about twice what it should take for OPT-1.3B on an H200.
CAPS = {"machine": 180, "model": 180, "variant": 150, "e2e": 240, "launcher": 180}
MIN_PART_S = 20  # a part that would get less is skipped


@dataclass
class Check:
    """A check as it runs: its settings, scratch folder, logs, deadline and results so far."""

    args: argparse.Namespace
    work: str
    logs: str
    deadline: float
    results: dict = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def timeout(self, cap: float) -> float | None:
        """`cap`, or what is left of the budget; None when too little is left."""
        left = self.deadline - time.monotonic()
        return min(cap, left) if left >= MIN_PART_S else None

    def record(self, part: str, value: dict, name: str | None = None) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.started, 1)
        if name is None:
            self.results[part] = value
        else:
            self.results.setdefault(part, {})[name] = value
        write_outputs(self.args.out, self.results, self.logs)
        print(f"{name or part}: {value.get('status')}", flush=True)

    def log(self, name: str) -> str:
        return os.path.join(self.logs, f"{name}.log")


class PartFailed(Exception):
    """A part could not be done; its message says why (the part's status)."""


def prepare_inputs(check: Check) -> dict | None:
    """The model and data folders (None when they could not be made), and the machine."""
    args, work = check.args, check.work
    machine: dict = {}
    probe = threading.Thread(target=describe_machine, args=(check, machine), daemon=True)
    probe.start()
    found: dict = {"status": "ok"}
    try:
        if args.tiny and not (args.model and args.dialogues):
            demo = os.path.join(work, "demo")
            _require(run(sources.demo_command(demo), check.log("inputs"), CAPS["model"]))
            found.update(model=os.path.join(demo, "tiny-opt"), data=os.path.join(demo, "data"))
        if args.model:
            found["model"] = args.model
        elif not args.tiny:
            found["model"] = build_model(check)
        if not args.tiny or args.dialogues:
            dialogues = args.dialogues or sources.default_dialogues()
            if dialogues is None:
                raise PartFailed("no HH-RLHF dialogues: pass --dialogues or copy them into .gpu/")
            found["data"] = os.path.join(work, "hh-rlhf")
            rows = (args.rows, args.eval_rows, args.seed)
            found.update(sources.write_hh_data(dialogues, found["data"], *rows))
    except (OSError, ValueError, PartFailed) as err:
        found["status"] = f"failed: {err}"
    probe.join()
    check.results["machine"] = machine
    check.record("inputs", found)
    return found if found["status"] == "ok" else None


def build_model(check: Check) -> str:
    """An OPT model folder of --model_size, built by build_opt_model.py."""
    folder = os.path.join(check.work, f"opt-{check.args.model_size}")
    built = sources.builder_command(folder, check.args.model_size)
    if built is None:
        raise PartFailed("no build_opt_model.py and opt-tokenizer in .gpu/ or ../shared/")
    command, env = built
    _require(run(command, check.log("inputs"), CAPS["model"], env=env))
    return folder


def _require(outcome: Outcome) -> None:
    if not outcome.ok:
        raise PartFailed(describe(outcome))


def describe_machine(check: Check, machine: dict) -> None:
    command = [sys.executable, "-m", "bench.gpu_check.machine"]
    outcome = run(command, check.log("machine"), CAPS["machine"])
    lines = [line for line in outcome.lines if line.startswith("{")]
    machine.update(json.loads(lines[-1]) if lines else {"status": _status(outcome)})


def main_flags(check: Check, inputs: dict, output_dir: str) -> list[str]:
    """main.py's flags shared by every part: the measured run's shape."""
    args = check.args
    return [
        "--model_name_or_path", inputs["model"], "--data_path", inputs["data"],
        "--data_split", "10,0,0", "--data_output_path", os.path.join(check.work, "data_cache"),
        "--max_seq_len", str(args.max_seq_len), "--per_device_train_batch_size", str(args.batch),
        "--per_device_eval_batch_size", str(args.batch), "--zero_stage", str(args.zero_stage),
        "--learning_rate", "1e-4", "--lr_scheduler_type", "constant", "--num_train_epochs", "1",
        "--seed", str(args.seed), "--output_dir", output_dir,
    ]  # fmt: skip


def run_variant(check: Check, name: str, inputs: dict) -> None:
    timeout = check.timeout(CAPS["variant"])
    record = {"variant_flags": " ".join(VARIANTS[name]), "log": f"{name}.log"}
    if timeout is None:
        check.record("variants", {**record, "status": "skipped: no time left"}, name)
        return
    result = os.path.join(check.work, "variants", f"{name}.json")
    os.makedirs(os.path.dirname(result), exist_ok=True)
    command = [sys.executable, "-m", "bench.gpu_check.variant", "--result", result]
    command += ["--steps", str(check.args.steps)]
    if name == "default":
        command += ["--profile_steps", str(check.args.profile_steps)]
    output_dir = os.path.join(check.work, "variants", name)
    command += ["--", *main_flags(check, inputs, output_dir), *VARIANTS[name]]
    outcome = run(command, check.log(name), timeout)
    record["wall_s"] = outcome.wall_s
    if os.path.isfile(result):
        with open(result) as f:
            record.update(json.load(f))
        record["status"] = "ok" if outcome.ok else f"ok, then {describe(outcome)}"
    else:
        record["status"] = _status(outcome)
    check.record("variants", record, name)


def run_e2e(check: Check, inputs: dict) -> None:
    """main.py as a user runs it: wall time from launch to a verified model folder."""
    timeout = check.timeout(CAPS["e2e"])
    if timeout is None:
        check.record("e2e", {"status": "skipped: no time left"})
        return
    output_dir = os.path.join(check.work, "e2e")
    command = [sys.executable, "main.py", *main_flags(check, inputs, output_dir)]
    outcome = run(
        command, check.log("e2e"), timeout, end_marker=END_MARKER, grace_s=check.args.grace_s
    )
    record = {**read_main_output(outcome.lines), **_timings(outcome), "log": "e2e.log"}
    record["status"] = _status(outcome, verified=record["verified"])
    check.record("e2e", record)


def run_launcher(check: Check, inputs: dict) -> None:
    """The single-GPU launcher for 4 steps: it must exit within --grace_s of its last line."""
    timeout = check.timeout(CAPS["launcher"])
    if timeout is None:
        check.record("launcher", {"script": LAUNCHER, "status": "skipped: no time left"})
        return
    output_dir = os.path.join(check.work, "launcher")
    command = ["bash", LAUNCHER, output_dir, "0", "--max_steps", "4"]
    command += ["--model_name_or_path", inputs["model"], "--data_path", inputs["data"]]
    command += ["--data_split", "10,0,0", "--max_seq_len", str(check.args.max_seq_len)]
    command += ["--data_output_path", os.path.join(check.work, "data_cache")]
    env = {**os.environ, "MASTER_PORT": str(_free_port())}
    outcome = run(
        command, check.log("launcher"), timeout, env=env, end_marker=END_MARKER,
        grace_s=check.args.grace_s, epilogue=EPILOGUE,
    )  # fmt: skip
    record = {"script": LAUNCHER, **_timings(outcome), "log": "launcher.log"}
    record["verified"] = any(line.startswith(END_MARKER) for line in outcome.lines)
    record["status"] = _status(outcome, verified=record["verified"])
    gap = outcome.exit_after_last_line_s
    if record["status"] == "ok" and gap is not None and gap > check.args.grace_s:
        record["status"] = f"failed: exited {gap:.1f} s after its last line"
    check.record("launcher", record)


THROUGHPUT = re.compile(
    r"throughput over the run: .*? (?P<tokens>[\d.]+) real tokens/s.*?step (?P<step>[\d.]+) s"
    r"(?:.*MFU (?P<mfu>[\d.]+)%)?"
)
EVAL_LOSS = re.compile(r"^ppl: [^,]+, loss: (?P<loss>\S+)$")
STEPS = re.compile(r"= (?P<steps>\d+) optimizer steps$")


def read_main_output(lines: list[str]) -> dict:
    """main.py's own figures, from the lines it printed."""
    found: dict = {"verified": any(line.startswith(END_MARKER) for line in lines)}
    losses = [float(m["loss"]) for line in lines if (m := EVAL_LOSS.match(line))]
    if losses:
        found.update(eval_loss_before=losses[0], eval_loss_after=losses[-1])
    for line in lines:
        if m := THROUGHPUT.search(line):
            found.update(real_tokens_per_s=float(m["tokens"]), step_s=float(m["step"]))
            found["mfu"] = float(m["mfu"]) / 100 if m["mfu"] else None
        if m := STEPS.search(line):
            found["steps"] = int(m["steps"])
    return found


def _timings(outcome: Outcome) -> dict:
    return {
        "returncode": outcome.returncode,
        "exit_wall_s": None if outcome.returncode is None else outcome.wall_s,
        "verified_s": outcome.end_marker_s,
        "exit_after_last_line_s": outcome.exit_after_last_line_s,
        "hung": outcome.hung,
    }


def _status(outcome: Outcome, verified: bool = True) -> str:
    if outcome.ok and verified:
        return "ok"
    if outcome.ok:
        return "failed: no verified model folder"
    return f"failed: {describe(outcome)}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
