"""One variant of the GPU check, in a process of its own (a fresh CUDA context, no kernel
shapes or allocator state left by another variant): main.py's own start-up with the
variant's flags, then the tool's own train step (utils/engine/loop.py's `train_step`) timed.

    python -m bench.gpu_check.variant --result R.json [--steps 50] [--profile_steps 20] \
        -- MAIN.PY FLAGS

Warm-up: one step on a micro-batch of every width the timed steps will see (read from the
loader's own batches first), and at least MIN_WARMUP steps (the optimizer's states and
DeepSpeed's buffers are created by the first steps). Then `--steps` timed steps drawn from
the loader main.py builds (pinned memory on a GPU, worker processes where it uses them),
each ended by a device synchronisation, so each step has its own time. Per step: wall time, data wait
(host clock) and forward, backward and optimizer-step times (`Phases`). `--profile_steps`
more steps then run under torch.profiler. The result JSON is written before the profile, so
a failing profile loses nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from itertools import chain, islice

import torch
from transformers import set_seed

from bench.gpu_check.phases import Phases, profile_top_ops
from main import build_loaders, build_loop, build_step_plan, load_model, recorded_settings
from utils.checkpoint.checkpointer import build_checkpointer
from utils.cli.parse import parse_args
from utils.cli.validate import validate
from utils.config import Config
from utils.data.build import build_sft_data
from utils.distributed import init_distributed
from utils.engine.accumulation import Window, accumulation_windows
from utils.engine.loop import TrainLoop, train_step
from utils.files import write_atomically
from utils.model.load import count_parameters
from utils.run_setup import RunSetup

MIN_WARMUP = 3


def main() -> None:
    """Measure, then leave at once: DataLoader worker processes can hold up interpreter exit
    (the launcher part measures that), and the result is already written."""
    code = 0
    try:
        measure(parse_harness_args())
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def measure(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    loop, cfg, setup = start_like_main(args.flags)
    startup_s = time.perf_counter() - started
    averaging = cfg.train.loss_averaging
    timed = min(args.steps, loop.plan.steps_per_epoch)
    ahead = list(windows_of_epoch(loop, 0, timed))  # the timed steps' batches, for their widths
    warm = warm_up_windows(ahead)
    phases = Phases(loop.engine, loop.dist.device)
    for window in warm:
        train_step(loop, window, averaging)
    _synchronize(loop.dist.device)
    print(f"warm-up: {len(warm)} steps over {len(widths(ahead))} widths", flush=True)
    # The epoch's start (worker processes starting, where there are any) is not a step's
    # cost: drawn first.
    windows = windows_of_epoch(loop, 0, timed)
    steps = time_steps(loop, chain([next(windows)], windows), averaging, phases)
    result = summarize(loop, cfg, setup, steps, warm, ahead)
    result.update(flags=args.flags, startup_s=startup_s)
    write_atomically(args.result, json.dumps(result, indent=1))
    print(
        f"{result['median_step_s']:.4f} s/step (median), {result['tokens_per_s']:.0f} real "
        f"tokens/s, MFU {result['mfu']}, peak {result['peak_gib']:.2f} GiB",
        flush=True,
    )
    if args.profile_steps:
        later = endless_windows(loop, first_epoch=1)
        result["profile"] = profile_top_ops(
            lambda: train_step(loop, next(later), averaging), args.profile_steps, loop.dist.device
        )
        write_atomically(args.result, json.dumps(result, indent=1))


def parse_harness_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--result", required=True, help="where the JSON result goes")
    p.add_argument("--steps", type=int, default=50, help="timed optimizer steps")
    p.add_argument("--profile_steps", type=int, default=0, help="steps under torch.profiler")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="main.py's flags, after --")
    args = p.parse_args()
    args.flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    return args


def start_like_main(flags: list[str]) -> tuple[TrainLoop, Config, RunSetup]:
    """main.py's start-up, step for step, up to the loop it would hand `train`."""
    cfg = parse_args(flags)
    dist = init_distributed(cfg.engine.local_rank, cfg.engine.dist_timeout_minutes)
    setup = validate(cfg, dist)
    set_seed(cfg.data.seed)
    data = build_sft_data(cfg.data, setup.tokenizer, setup.template)
    train_loader, eval_loader = build_loaders(cfg, data, setup, dist)
    plan = build_step_plan(cfg, train_loader)
    checkpointer = build_checkpointer(
        cfg.checkpoint, cfg.train.output_dir, recorded_settings(cfg, data, setup), dist
    )
    model = load_model(cfg, setup)
    loop = build_loop(cfg, setup, model, train_loader, eval_loader, plan, checkpointer, dist)
    print(
        f"{count_parameters(model)[0] / 1e6:.1f}M parameters; loss {setup.loss.describe()}",
        flush=True,
    )
    return loop, cfg, setup


def windows_of_epoch(loop: TrainLoop, epoch: int, count: int) -> Iterator[Window]:
    """The first `count` optimizer steps of `epoch`, in the order main.py trains them."""
    loop.train_loader.sampler.set_epoch(epoch)
    windows = accumulation_windows(loop.train_loader, loop.plan.accumulation, loop.dist.device)
    return islice(windows, count)


def endless_windows(loop: TrainLoop, first_epoch: int) -> Iterator[Window]:
    epoch = first_epoch
    while True:
        yield from windows_of_epoch(loop, epoch, loop.plan.steps_per_epoch)
        epoch += 1


def widths(windows: list[Window]) -> set[int]:
    return {b["input_ids"].shape[1] for w in windows for b in w.batches}


def warm_up_windows(ahead: list[Window]) -> list[Window]:
    """A window for every micro-batch width in `ahead`, at least MIN_WARMUP of them."""
    seen: set[int] = set()
    warm = []
    for window in ahead:
        new = widths([window]) - seen
        if new:
            warm.append(window)
            seen |= new
    while ahead and len(warm) < MIN_WARMUP:
        warm.append(ahead[len(warm) % len(ahead)])
    return warm


def time_steps(
    loop: TrainLoop, windows: Iterator[Window], averaging: str, phases: Phases
) -> list[dict]:
    """Each step from the loader's next() to the device finishing its optimizer step."""
    device, totals, steps = loop.dist.device, loop.meter.total, []
    while True:
        before = dict(totals)
        phases.begin_step()
        began = time.perf_counter()
        window = next(windows, None)
        waited = time.perf_counter() - began
        if window is None:
            return steps
        nll = train_step(loop, window, averaging)
        _synchronize(device)
        step = {"s": time.perf_counter() - began, "data_s": waited, **phases.end_step()}
        step["loss"] = float(nll) / max(window.tokens, 1)  # read after the step's time
        step.update({key: totals[key] - before[key] for key in ("real", "padded", "sum_sq")})
        steps.append(step)


def summarize(
    loop: TrainLoop,
    cfg: Config,
    setup: RunSetup,
    steps: list[dict],
    warm: list[Window],
    ahead: list[Window],
) -> dict:
    device, meter = loop.dist.device, loop.meter
    seconds = sum(s["s"] for s in steps)
    real = sum(s["real"] for s in steps)
    flops = meter.shape.training_flops(real, sum(s["sum_sq"] for s in steps))
    on_cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(device) if on_cuda else _peak_rss()
    return {
        "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "dtype": setup.engine.dtype,
        "zero_stage": loop.engine.zero_optimization_stage(),
        "loss_path": loop.loss.describe(),
        "parameters": count_parameters(loop.engine.module)[0],
        "micro_batch": setup.engine.config["train_micro_batch_size_per_gpu"],  # the merged config's
        "max_seq_len": cfg.data.max_seq_len,
        "warmup_steps": len(warm),
        "widths": sorted(widths(ahead)),
        "timed_steps": len(steps),
        "steps": steps,
        "median_step_s": statistics.median(s["s"] for s in steps),
        "tokens_per_s": real / seconds,
        "median_tokens_per_s": statistics.median(s["real"] / s["s"] for s in steps),
        "padding": 1 - real / max(sum(s["padded"] for s in steps), 1),
        "mfu": flops / seconds / 1e12 / meter.peak if meter.peak else None,
        "peak_gib": peak / 2**30,
        "peak_kind": "max_memory_allocated" if on_cuda else "peak RSS",
        "phases_median_s": {
            key: statistics.median(s[key] for s in steps) for key in ("data_s", *Phases.NAMES)
        },
    }


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
