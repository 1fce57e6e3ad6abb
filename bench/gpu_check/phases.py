"""Where a training step's time goes: its forward, backward and optimizer step, and the
operations a profiler sees (top by device time and by CPU time)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


class Phases:
    """Forward, backward and optimizer-step time of each step, measured around the engine's
    own methods: instance attributes shadow them, so the tool's train step runs unchanged.

    On a GPU each call is bracketed by CUDA events recorded on the stream (no
    synchronisation added; they are read once the step has synchronised); on a CPU by the
    host clock (the work there is synchronous).
    """

    NAMES = ("forward_s", "backward_s", "optimizer_s")

    def __init__(self, engine, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object, object]] = []
        for name, method in zip(self.NAMES, ("forward", "backward", "step"), strict=True):
            setattr(engine, method, self._timed(name, getattr(engine, method)))

    def _timed(self, name: str, method: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = self._now()
            try:
                return method(*args, **kwargs)
            finally:
                self.marks.append((name, start, self._now()))

        return timed

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin_step(self) -> None:
        self.marks = []

    def end_step(self) -> dict[str, float]:
        """Seconds per phase since `begin_step`; call after the device has synchronised."""
        totals = dict.fromkeys(self.NAMES, 0.0)
        for name, start, end in self.marks:
            totals[name] += start.elapsed_time(end) / 1e3 if self.cuda else end - start
        return totals


def profile_top_ops(
    step: Callable[[], object], steps: int, device: torch.device, top: int = 12
) -> dict:
    """Run `step` `steps` times under torch.profiler; the operations that took the most
    device time and the most CPU time (self time, per step)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    ops = prof.key_averages()

    def ranked(key: str) -> list[dict]:
        rows = sorted(ops, key=lambda op: getattr(op, key), reverse=True)[:top]
        return [
            {
                "name": op.key[:100],
                "calls_per_step": op.count / steps,
                "self_device_ms": op.self_device_time_total / 1e3 / steps,
                "self_cpu_ms": op.self_cpu_time_total / 1e3 / steps,
            }
            for op in rows
            if getattr(op, key) > 0
        ]

    return {
        "steps": steps,
        "device_ms_per_step": sum(op.self_device_time_total for op in ops) / 1e3 / steps,
        "cpu_ms_per_step": sum(op.self_cpu_time_total for op in ops) / 1e3 / steps,
        "by_device": ranked("self_device_time_total"),
        "by_cpu": ranked("self_cpu_time_total"),
    }
