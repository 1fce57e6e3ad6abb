"""Benchmark: the training step's fixed cost, our engine against a bare torch loop.

A model with OPT-1.3B's tensor layout (24 decoder layers, the same parameter tensors) but
tiny widths (hidden 64, vocab 1024), so that a step's time is framework overhead, not
matrix work. Variants, on the same micro-batches (8 rows of 16-64 tokens, padded as the
tool pads them):

  bare     forward, token-mean cross-entropy, backward, clip to norm 1, torch AdamW
           (fused) step, zero_grad(set_to_none): what a step cannot do without
  zero<N>  the tool's own path at ZeRO stage N: its DeepSpeed config (build_ds_config),
           optimizer and schedule (utils/engine/optim.py), loss path (choose_loss_path),
           accumulation windows (they carry the stop signals too), train_step and
           log_step (utils/engine/loop.py)

Variants run interleaved (a few steps of each in turn, repeated) in one process on a
one-rank group; each variant's figure is its median step time.

    OMP_NUM_THREADS=1 python bench/step_overhead.py                  # CPU, ~2 minutes
    python bench/step_overhead.py --profile zero2                    # where a step goes

Last line: `zero0/bare=R zero1/bare=R zero2/bare=R` (median step time ratios).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import deepspeed
import torch
import torch.nn.functional as F
from transformers import OPTConfig, OPTForCausalLM

from utils.data.collate import collate
from utils.data.common import IGNORE_INDEX
from utils.distributed import init_distributed
from utils.engine.accumulation import StepPlan, accumulation_windows
from utils.engine.config import EngineConfig, TrainConfig
from utils.engine.ds_config import EngineSetup, build_ds_config
from utils.engine.loop import TrainLoop, log_step, train_step
from utils.engine.optim import build_optimizer, build_param_groups, build_scheduler
from utils.model.config import LoraConfig
from utils.model.loss import choose_loss_path
from utils.observe.config import ObserveConfig
from utils.observe.progress import RunMonitor
from utils.observe.throughput import build_meter

PAD = 1
VOCAB = 1024
MICRO_BATCH = 8


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=12, help="turns of every variant")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per turn")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per step")
    p.add_argument("--variants", default="bare,zero0,zero1,zero2")
    p.add_argument("--profile", default=None, help="print torch.profiler's table for a variant")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args()


def build_model(seed: int, device: torch.device) -> OPTForCausalLM:
    """OPT-1.3B's layout (24 layers, every tensor it has) at tiny widths."""
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        word_embed_proj_dim=64,
        num_hidden_layers=24,
        num_attention_heads=4,
        ffn_dim=256,
        max_position_embeddings=128,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=PAD,
    )
    torch.manual_seed(seed)
    with device:
        return OPTForCausalLM(config)


def build_batches(seed: int, count: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        lengths = torch.randint(16, 65, (MICRO_BATCH,), generator=gen).tolist()
        rows = [
            {"input_ids": torch.randint(4, VOCAB, (n,), generator=gen).tolist(),
             "loss_spans": [[n // 3, n]]}
            for n in lengths
        ]  # fmt: skip
        batches.append(collate(rows, pad_token_id=PAD, loss_on="all"))
    return batches


class Bare:
    """The minimum a training step does, in plain torch."""

    def __init__(self, args, device: torch.device) -> None:
        self.device = device
        self.model = build_model(args.seed, device)
        self.autocast = args.dtype == "bf16"
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True
        )

    def step(self, micro_batches) -> None:
        tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
        for batch in micro_batches:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                logits = self.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
            nll = F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), reduction="sum")
            (nll / tokens).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class Ours:
    """The tool's step at one ZeRO stage, built by the tool's own builders."""

    def __init__(self, args, zero_stage: int, dist, total_steps: int) -> None:
        device = dist.device
        train = TrainConfig(
            per_device_train_batch_size=MICRO_BATCH,
            gradient_accumulation_steps=args.accumulation,
            learning_rate=1e-4,
            lr_scheduler_type="constant",
        )
        config = build_ds_config(
            EngineConfig(zero_stage=zero_stage),
            train,
            ObserveConfig(),
            world_size=1,
            dtype=args.dtype,
            on_cuda=device.type == "cuda",
        )
        model = build_model(args.seed, device)
        setup = EngineSetup(config, dtype_reason=args.dtype)
        groups = build_param_groups(model, train, LoraConfig())
        optimizer = build_optimizer(groups, train, setup, device.type)
        scheduler = build_scheduler(optimizer, train, total_steps)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        loss = choose_loss_path(
            model, "auto", zero_stage=zero_stage, device_type=device.type, fp32=False,
            compiled=False,
        )  # fmt: skip
        self.loop = TrainLoop(
            engine=self.engine,
            train_loader=None,
            eval_loader=None,
            dist=dist,
            plan=StepPlan(total_steps * args.accumulation, args.accumulation, 1),
            monitor=RunMonitor(None, total_steps, enabled=False),
            meter=build_meter(self.engine, False, None, dist),
            checkpointer=SimpleNamespace(due=lambda step: False),  # no checkpoints here
            loss=loss,
        )
        self.accumulation = args.accumulation

    def step(self, micro_batches) -> None:
        (window,) = accumulation_windows(micro_batches, self.accumulation, self.loop.dist.device)
        step_nll = train_step(self.loop, window, "token")
        log_step(self.loop, 1, window, step_nll)


def _windows(batches: list, accumulation: int):
    cycle = itertools.cycle(batches)
    while True:
        yield list(itertools.islice(cycle, accumulation))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(variant, windows, count: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(count):
        micro_batches = next(windows)
        _sync(device)
        began = time.perf_counter()
        variant.step(micro_batches)
        _sync(device)
        times.append(time.perf_counter() - began)
    return times


def profile(variant, windows, device: torch.device, steps: int = 10) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities, with_stack=False) as prof:
        timed_steps(variant, windows, steps, device)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))


def main() -> None:
    args = parse_args()
    dist = init_distributed()
    device = dist.device
    names = args.variants.split(",")
    total = len(names) * (args.warmup + args.rounds * args.steps) + 10
    batches = build_batches(args.seed, 32)
    variants = {}
    for name in names:
        if name == "bare":
            variants[name] = Bare(args, device)
        else:
            variants[name] = Ours(args, int(name.removeprefix("zero")), dist, total)
    # Every variant sees the same windows of micro-batches in the same order.
    windows = {name: _windows(batches, args.accumulation) for name in names}
    for name in names:
        timed_steps(variants[name], windows[name], args.warmup, device)
    if args.profile:
        profile(variants[args.profile], windows[args.profile], device)
        return
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            times[name] += timed_steps(variants[name], windows[name], args.steps, device)
    medians = {name: statistics.median(t) for name, t in times.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{where}, {torch.get_num_threads()} threads, {args.dtype}, micro-batch {MICRO_BATCH}, "
        f"accumulation {args.accumulation}, {args.rounds}x{args.steps} steps per variant"
    )
    for name in names:
        print(f"{name:6s} median step {medians[name] * 1e3:8.2f} ms")
    if "bare" in medians:
        print(
            " ".join(f"{n}/bare={medians[n] / medians['bare']:.2f}" for n in names if n != "bare")
        )


if __name__ == "__main__":
    main()
