"""What a run shows while it trains: a progress bar or plain lines, metrics.jsonl,
TensorBoard scalars, and training_curves.png at the end. Rank 0 only.

A person at a terminal gets a tqdm bar (step, loss, learning rate, tokens/s, ETA); a
pipe or file (CI, the launchers' training.log) gets one plain line per logging
interval, so logs hold no carriage returns or escape codes.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from typing import TextIO

from utils.distributed import is_main_process
from utils.files import atomic_path, write_atomically
from utils.observe.config import ObserveConfig

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"
LOG_EVERY = 10  # optimizer steps between logged steps (every step with --print_loss)


def build_monitor(
    output_dir: str | None, cfg: ObserveConfig, total_steps: int, start_step: int
) -> RunMonitor:
    """The monitor main.py hands the loop; TensorBoard scalars go to <tensorboard_path>/sft."""
    tensorboard = cfg.tensorboard_path if cfg.enable_tensorboard else None
    return RunMonitor(
        output_dir,
        total_steps,
        start_step=start_step,
        tensorboard_dir=os.path.join(tensorboard, "sft") if tensorboard else None,
        print_loss=cfg.print_loss,
    )


class RunMonitor:
    """Receives the loop's numbers; decides how to show and where to keep them.

    `start_step` > 0 means a resumed run: metrics.jsonl keeps the rows up to that step
    and continues; a fresh run starts the file anew.
    """

    def __init__(
        self,
        output_dir: str | None,
        total_steps: int,
        start_step: int = 0,
        tensorboard_dir: str | None = None,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        print_loss: bool = False,
    ) -> None:
        self.enabled = is_main_process() if enabled is None else enabled
        self.total_steps = total_steps
        self.print_loss = print_loss
        self.start_step = start_step
        self.stream = stream or sys.stdout
        self.started = time.perf_counter()
        self.skipped_steps = 0
        self.metrics_path = os.path.join(output_dir, METRICS_FILE) if output_dir else None
        self.curves_path = os.path.join(output_dir, CURVES_FILE) if output_dir else None
        self._metrics: TextIO | None = None
        self._tensorboard = None
        self._bar = None
        self._stdout: TextIO | None = None
        if not self.enabled:
            return
        if self.metrics_path:
            self._metrics = open_metrics(self.metrics_path, start_step)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(tensorboard_dir)
        if self.stream.isatty():
            from tqdm import tqdm
            from tqdm.contrib import DummyTqdmFile

            if self.stream is sys.stdout:
                # Other prints (eval results, warnings) go through tqdm.write, above the bar.
                self._stdout = sys.stdout
                sys.stdout = DummyTqdmFile(self.stream)
            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
            )

    def advance(self, step: int) -> None:
        """Move the bar to `step` (cheap: no device sync; call after every optimizer step)."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def due(self, step: int) -> bool:
        """Whether `step` is logged (the same answer on every rank: logging is collective)."""
        return self.print_loss or step % LOG_EVERY == 0 or step == self.total_steps

    def record_step(self, step: int, epoch: int, **values: float | None) -> None:
        """One logging interval: loss, lr, grad_norm, tokens_per_s, skipped_steps, ..."""
        if not self.enabled:
            return
        self.skipped_steps = int(values.get("skipped_steps") or 0)
        row = {"type": "train", "step": step, "epoch": epoch, **_finite(values)}
        self._write(row)
        self._scalars("train", step, values)
        if self._bar is not None:
            self.advance(step)
            self._bar.set_postfix_str(_format_values(values), refresh=True)
        else:
            line = f"epoch {epoch} step {step}/{self.total_steps} {_format_values(values)}"
            print(f"{line} eta {self._eta(step)}", file=self.stream, flush=True)

    def record_eval(self, step: int, epoch: int, result) -> None:
        """Record an evaluation (`result` has .loss and .perplexity; printing is print_eval's)."""
        if not self.enabled:
            return
        values = {"loss": result.loss, "perplexity": result.perplexity}
        row = {"eval_loss": result.loss, "eval_perplexity": result.perplexity}
        self._write({"type": "eval", "step": step, "epoch": epoch, **_finite(row)})
        self._scalars("eval", step, values)

    def close(self) -> None:
        """Finish the bar, report skipped steps, flush files and draw the curves."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._stdout is not None:
            sys.stdout = self._stdout
        if self.skipped_steps:
            print(
                f"warning: {self.skipped_steps} optimizer steps were skipped because the fp16 "
                "loss scale overflowed; many skips mean fp16 is unstable here: try --dtype bf16.",
                file=sys.stderr,
                flush=True,
            )
        if self._metrics is not None:
            self._metrics.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self.metrics_path and self.curves_path:
            save_curves(load_metrics(self.metrics_path), self.curves_path)

    def _write(self, row: dict) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(row) + "\n")
            self._metrics.flush()  # a crash loses at most the line being written

    def _scalars(self, group: str, step: int, values: dict) -> None:
        if self._tensorboard is None:
            return
        for name, value in values.items():
            if isinstance(value, int | float) and math.isfinite(value):
                self._tensorboard.add_scalar(f"{group}/{name}", value, step)
        self._tensorboard.flush()

    def _eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        seconds = (self.total_steps - step) * (time.perf_counter() - self.started) / done
        return format_duration(seconds)


def open_metrics(path: str, start_step: int) -> TextIO:
    """metrics.jsonl opened for appending; a resumed run keeps the rows up to its step.

    Rows past `start_step` (written after the checkpoint being resumed) and a torn last
    line from a crash are dropped, by an atomic rewrite, so every line always parses.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    kept = [r for r in load_metrics(path) if r.get("step", 0) <= start_step] if start_step else []
    write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))
    return open(path, "a")


def load_metrics(path: str) -> list[dict]:
    """Every complete row of a metrics file (a torn trailing line is ignored)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def save_curves(rows: list[dict], path: str) -> bool:
    """Training loss and eval perplexity against step, as a PNG (headless). False if no rows."""
    train = [(r["step"], r["loss"]) for r in rows if r["type"] == "train" and r.get("loss")]
    evals = [
        (r["step"], r["eval_perplexity"])
        for r in rows
        if r["type"] == "eval" and r.get("eval_perplexity") is not None
    ]
    if not train and not evals:
        return False
    _draw_curves(train, evals, path)
    # Laying out the log axis's tick labels runs matplotlib's mathtext parser (pyparsing),
    # which leaves reference cycles of exceptions it caught: their tracebacks hold every
    # calling frame, up to main()'s with the engine and the loaders, until the next garbage
    # collection, maybe only at exit. Collect them (and the figure) now.
    gc.collect()
    return True


def _draw_curves(train: list[tuple], evals: list[tuple], path: str) -> None:
    # Figure without pyplot: no global state and no GUI backend, works on any server.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_axes, ppl_axes = figure.subplots(1, 2)
    loss_axes.plot(*zip(*train, strict=True), marker="." if len(train) < 50 else None)
    loss_axes.set(title="training loss", xlabel="step", ylabel="loss")
    if evals:
        ppl_axes.plot(*zip(*evals, strict=True), marker="o", color="tab:orange")
        ppl_axes.set_yscale("log")
    ppl_axes.set(title="eval perplexity", xlabel="step", ylabel="perplexity")
    for axes in (loss_axes, ppl_axes):
        axes.grid(alpha=0.3)
    with atomic_path(path) as staging:
        figure.savefig(staging, dpi=100, format="png")


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _format_values(values: dict) -> str:
    parts = []
    for name, value in values.items():
        if value is None or (name == "skipped_steps" and not value):
            continue
        if name == "lr":
            parts.append(f"lr {value:.3g}")
        elif "tokens" in name:
            parts.append(f"{name} {value:.0f}")
        elif isinstance(value, float):
            parts.append(f"{name} {value:.4f}")
        else:
            parts.append(f"{name} {value}")
    return " ".join(parts)


def _finite(values: dict) -> dict:
    """JSON-safe values: NaN/inf become null (strict JSON has no such numbers)."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()
    }


def grad_norm(engine) -> float | None:
    """The last step's global gradient norm, where DeepSpeed tracks one (None elsewhere)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)
