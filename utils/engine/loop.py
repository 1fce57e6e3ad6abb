"""The training loop and its evaluation.

`train(loop, cfg)` evaluates the starting point, then runs the epochs: each epoch's
micro-batches are grouped into accumulation windows (utils/engine/accumulation.py), each
window is one optimizer step, and the model is evaluated after every epoch. The loss is
pulled to the host only on the steps that are logged; token counts come from the host-side
labels, so a step that is not logged never waits for the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from utils.checkpoint.checkpointer import Checkpointer
from utils.checkpoint.position import DataPosition, EpochProgress, start_epoch
from utils.checkpoint.preemption import stop_requested
from utils.data.common import IGNORE_INDEX
from utils.data.loaders import open_batches
from utils.distributed import DistInfo, all_reduce_max, all_reduce_sum, print_rank_0
from utils.engine.accumulation import (
    StepPlan,
    Window,
    accumulation_windows,
    micro_batch_loss,
)
from utils.engine.config import TrainConfig
from utils.engine.loss_watch import LossWatch
from utils.model.loss import LossPath, count_trained, prepare_batch, summed_nll
from utils.observe.progress import RunMonitor, grad_norm
from utils.observe.throughput import ThroughputMeter, format_throughput


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int


@dataclass(frozen=True)
class TrainOutcome:
    """How training ended: its evaluations (the starting point's first, then one per epoch)
    and, when a signal stopped it early, the signal's name (its checkpoint is written)."""

    evals: list[EvalResult]
    preempted: str | None


@dataclass
class TrainLoop:
    """What the loop drives: the engine and its data, and who watches and checkpoints it."""

    engine: Any  # deepspeed.DeepSpeedEngine
    train_loader: DataLoader
    eval_loader: DataLoader
    dist: DistInfo
    plan: StepPlan
    monitor: RunMonitor
    meter: ThroughputMeter
    checkpointer: Checkpointer
    loss: LossPath  # chunked or plain, decided once at start-up (utils/model/loss.py)
    watch: LossWatch = field(default_factory=LossWatch)  # a NaN/inf loss stops the run


def train(loop: TrainLoop, cfg: TrainConfig) -> TrainOutcome:
    """Evaluate the starting point, then train from the checkpointer's start position,
    evaluating after every epoch; returns early when a signal stops the run."""
    engine, plan, position = loop.engine, loop.plan, loop.checkpointer.start
    with loop.meter.paused():  # evaluation is not training time
        results = [evaluate_and_report(loop, epoch=0, label="Epoch 0 (before training)")]
    try:
        for epoch in range(position.epoch, cfg.num_train_epochs):
            if engine.global_steps >= plan.total_steps:  # resumed from the run's last checkpoint
                break
            # A new order every epoch (DeepSpeed-Chat never tells its sampler the epoch); a
            # resumed epoch goes on with the rows its checkpoint had not trained yet.
            progress = start_epoch(loop.train_loader.sampler, position)
            print_rank_0(
                f"Beginning of Epoch {epoch + 1}/{cfg.num_train_epochs}, "
                f"Total Micro Batches {len(loop.train_loader.sampler)}"
            )
            if train_epoch(loop, epoch + 1, progress, position, cfg):  # stopped by a signal
                return TrainOutcome(results, loop.checkpointer.preempted)
            loop.watch.check(loop.dist.device)  # a NaN/inf loss is never evaluated or saved
            label = f"Epoch {epoch + 1}/{cfg.num_train_epochs}"
            with loop.meter.paused():
                results.append(evaluate_and_report(loop, epoch=epoch + 1, label=label))
            position = DataPosition(epoch + 1)
            if loop.checkpointer.after_epoch(engine, position):
                return TrainOutcome(results, loop.checkpointer.preempted)
        print_rank_0(
            f"throughput over the run: {format_throughput(loop.meter.report(overall=True))}"
        )
        return TrainOutcome(results, preempted=None)
    finally:
        loop.monitor.close()


def train_epoch(
    loop: TrainLoop, epoch: int, progress: EpochProgress, position: DataPosition, cfg: TrainConfig
) -> bool:
    """Train the epoch's remaining steps from `position` (up to the plan's last); True when
    a stop signal ended the run (its checkpoint is written). The loader's worker processes
    stop when the epoch ends, however it ends (an error, Ctrl-C, a signal, --max_steps)."""
    engine, device = loop.engine, loop.dist.device
    with open_batches(loop.train_loader) as batches:
        for window in accumulation_windows(batches, cfg.gradient_accumulation_steps, device):
            # A signal during the last step (the window's all-reduce brought it).
            if stop_for(loop, window.stop, position):
                return True
            step_nll = train_step(loop, window, cfg.loss_averaging)
            position = progress.advance(len(window.batches))
            log_step(loop, epoch, window, step_nll)
            loop.checkpointer.after_step(engine, position)
            if engine.global_steps >= loop.plan.total_steps:
                break
    # A signal during the epoch's last step: checkpoint before its evaluation.
    return stop_for(loop, stop_requested(device), position)


def stop_for(loop: TrainLoop, signal: str | None, position: DataPosition) -> bool:
    """On a stop signal (the same answer on every rank), checkpoint where training stands,
    unless a NaN/inf loss has spoiled it (that stops the run instead); True: stop now."""
    if signal:
        loop.watch.check(loop.dist.device)
    return loop.checkpointer.stop_for(signal, loop.engine, position)


def train_step(loop: TrainLoop, window: Window, loss_averaging: str) -> torch.Tensor:
    """One optimizer step over the window's micro-batches; the step's summed NLL (on device)."""
    engine, device = loop.engine, loop.dist.device
    step_nll = torch.zeros((), device=device)
    for i, (batch, count) in enumerate(zip(window.batches, window.counts, strict=True)):
        loop.meter.add_batch(batch)
        batch = prepare_batch(batch, loop.loss, device)
        # The window may be shorter than --gradient_accumulation_steps (an epoch's last
        # step): its last micro-batch is where the optimizer steps.
        engine.set_gradient_accumulation_boundary(i == len(window.batches) - 1)
        nll = summed_nll(engine, batch, loop.loss)
        loss = micro_batch_loss(nll, count, window, loss_averaging, loop.dist.world_size)
        # The loss is already divided over the window; DeepSpeed must not divide again.
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
        step_nll += nll.detach()
    loop.meter.end_step()
    return step_nll


def log_step(loop: TrainLoop, epoch: int, window: Window, step_nll: torch.Tensor) -> None:
    """Advance the progress display; on logged steps, gather and record the step's figures."""
    step = loop.engine.global_steps
    loop.monitor.advance(step)
    due = loop.monitor.due(step)
    if not loop.engine.fp16_enabled():  # fp16: DeepSpeed's loss scaler skips such steps
        loop.watch.see(step, step_nll)
        if due or loop.checkpointer.due(step):  # never log or save what a NaN has spoiled
            loop.watch.check(loop.dist.device)
    if not due:
        return  # no host sync, no collective on the steps nobody reads
    (step_nll,) = all_reduce_sum([float(step_nll)], loop.dist.device)
    loop.monitor.record_step(
        step,
        epoch,
        loss=step_nll / max(window.tokens, 1),  # token mean of the whole step
        lr=loop.engine.get_lr()[0],
        grad_norm=grad_norm(loop.engine),
        skipped_steps=loop.engine.skipped_steps,  # fp16 loss-scale overflows
        **loop.meter.report(),
    )


def evaluate_and_report(loop: TrainLoop, epoch: int, label: str) -> EvalResult:
    result = evaluate(loop.engine, loop.eval_loader, loop.dist, loop.loss)
    print_eval(result, label)
    loop.monitor.record_eval(loop.engine.global_steps, epoch, result)
    return result


@torch.no_grad()
def evaluate(engine, loader: DataLoader, dist: DistInfo, loss: LossPath) -> EvalResult:
    """Token-weighted loss and perplexity over every eval row, each counted once across ranks,
    with the training loss's path (chunked or plain).

    Ranks can hold different numbers of batches; at ZeRO-3 each forward is a collective,
    so ranks that run out repeat a batch with zero weight until all are done.
    """
    engine.eval()
    batches = list(loader)
    rounds = all_reduce_max(len(batches), dist.device)
    nll_sum, tokens = torch.zeros((), dtype=torch.float64, device=dist.device), 0
    for i in range(rounds):
        batch = batches[min(i, len(batches) - 1)] if batches else _empty_batch()
        nll = summed_nll(engine, prepare_batch(batch, loss, dist.device), loss)
        if i < len(batches):
            nll_sum += nll
            tokens += count_trained(batch["labels"])
    nll_sum, tokens = all_reduce_sum([float(nll_sum), tokens], dist.device)
    engine.train()
    loss = nll_sum / max(tokens, 1)
    return EvalResult(loss=loss, perplexity=_safe_exp(loss), tokens=int(tokens))


def _empty_batch() -> dict[str, torch.Tensor]:
    """A rank with no eval rows at all still joins the collectives, with nothing to score."""
    ids = torch.zeros((1, 8), dtype=torch.long)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.full_like(ids, IGNORE_INDEX),
    }


def _safe_exp(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def print_eval(result: EvalResult, label: str) -> None:
    # "ppl: <value>, loss: <value>" is DeepSpeed-Chat's format; log parsers rely on it.
    print_rank_0(f"***** Evaluating perplexity, {label} *****")
    print_rank_0(f"ppl: {result.perplexity}, loss: {result.loss}")
