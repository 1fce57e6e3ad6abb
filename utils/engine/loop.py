"""The training loop and evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from utils.config import TrainConfig
from utils.data.common import IGNORE_INDEX
from utils.data.loaders import MODEL_INPUTS
from utils.distributed import DistInfo, all_reduce_max, all_reduce_sum, print_rank_0
from utils.engine.accumulation import accumulation_windows, micro_batch_loss
from utils.engine.checkpoint import Checkpointer, DataPosition, skip_batches
from utils.observe.progress import RunMonitor, grad_norm
from utils.observe.throughput import ThroughputMeter, format_throughput


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int


def token_nll(logits: torch.Tensor, labels: torch.Tensor, fp32: bool) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood over non-ignored labels, and their count.

    logits: [B, T, V]; labels: [B, T] (IGNORE_INDEX where no loss applies).
    """
    shifted_logits = logits[:, :-1, :]
    shifted_labels = labels[:, 1:]
    if fp32:
        shifted_logits = shifted_logits.float()
    nll = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return nll, int((shifted_labels != IGNORE_INDEX).sum())


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_nll(engine, batch: dict[str, torch.Tensor], fp32: bool) -> tuple[torch.Tensor, int]:
    labels = batch["labels"]
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    logits = engine(**inputs, use_cache=False).logits
    return token_nll(logits, labels, fp32)


@torch.no_grad()
def evaluate(engine, loader: DataLoader, dist: DistInfo, fp32_loss: bool) -> EvalResult:
    """Token-weighted loss and perplexity over every eval row, each counted once across ranks.

    Ranks can hold different numbers of batches; at ZeRO-3 each forward is a collective,
    so ranks that run out repeat a batch with zero weight until all are done.
    """
    engine.eval()
    batches = list(loader)
    rounds = all_reduce_max(len(batches), dist.device)
    nll_sum, tokens = 0.0, 0
    for i in range(rounds):
        batch = to_device(batches[min(i, len(batches) - 1)], dist.device) if batches else None
        if batch is None:  # a rank with no rows at all still joins the collectives
            batch = to_device(_empty_like_batch(dist.device), dist.device)
        nll, count = forward_nll(engine, batch, fp32_loss)
        if i < len(batches):
            nll_sum += float(nll)
            tokens += count
    nll_sum, tokens = all_reduce_sum([nll_sum, tokens], dist.device)
    engine.train()
    loss = nll_sum / max(tokens, 1)
    return EvalResult(loss=loss, perplexity=_safe_exp(loss), tokens=int(tokens))


def _empty_like_batch(device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.zeros((1, 8), dtype=torch.long, device=device)
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


def log_eval(result: EvalResult, label: str) -> None:
    # "ppl: <value>, loss: <value>" is DeepSpeed-Chat's format; log parsers rely on it.
    print_rank_0(f"***** Evaluating perplexity, {label} *****")
    print_rank_0(f"ppl: {result.perplexity}, loss: {result.loss}")


def train(
    engine,
    train_loader: DataLoader,
    eval_loader: DataLoader,
    train_cfg: TrainConfig,
    dist: DistInfo,
    total_steps: int,
    fp32_loss: bool,
    monitor: RunMonitor,
    meter: ThroughputMeter,
    run: Checkpointer,
    loss_averaging: str = "token",
    log_every: int = 10,
) -> list[EvalResult]:
    """Run the epochs from `run.start`; evaluate after each. Returns the per-epoch eval results.

    Returns early, with `run.preempted` set, when a preemption signal stopped the run.
    """
    results, carry = [], []
    for epoch in range(run.start.epoch, train_cfg.num_train_epochs):
        if engine.global_steps >= total_steps:  # resumed from the run's last checkpoint
            break
        # A new order every epoch (DeepSpeed-Chat never tells its sampler the epoch).
        train_loader.sampler.set_epoch(epoch)
        consumed = run.start.micro_batches if epoch == run.start.epoch else 0
        print_rank_0(
            f"Beginning of Epoch {epoch + 1}/{train_cfg.num_train_epochs}, "
            f"Total Micro Batches {len(train_loader)}"
        )
        carried = len(carry)  # the last epoch's leftovers open this epoch's first window
        windows = accumulation_windows(
            skip_batches(train_loader, consumed),
            train_cfg.gradient_accumulation_steps,
            dist.device,
            carry,
        )
        for window in windows:
            step_nll = 0.0
            for i, batch in enumerate(window.batches):
                meter.add_batch(batch)
                batch = to_device(batch, dist.device)
                engine.set_gradient_accumulation_boundary(i == len(window.batches) - 1)
                nll, count = forward_nll(engine, batch, fp32_loss)
                loss = micro_batch_loss(nll, count, window, loss_averaging, dist.world_size)
                # The loss is already divided over the window; DeepSpeed must not divide again.
                engine.backward(loss, scale_wrt_gas=False)
                engine.step()
                step_nll = step_nll + nll.detach()
            meter.end_step()
            consumed += len(window.batches) - carried  # the data position counts this epoch's
            carried = 0
            step = engine.global_steps
            monitor.advance(step)
            if train_cfg.print_loss or step % log_every == 0 or step == total_steps:
                (step_nll,) = all_reduce_sum([float(step_nll)], dist.device)
                monitor.log_step(
                    step,
                    epoch + 1,
                    loss=step_nll / max(window.tokens, 1),  # token mean of the whole step
                    lr=engine.get_lr()[0],
                    grad_norm=grad_norm(engine),
                    skipped_steps=engine.skipped_steps,  # fp16 loss-scale overflows
                    **meter.report(),
                )
            if run.after_step(engine, DataPosition(epoch, consumed)):
                return results
            if step >= total_steps:
                break
        with meter.paused():
            result = evaluate(engine, eval_loader, dist, fp32_loss)
        log_eval(result, f"Epoch {epoch + 1}/{train_cfg.num_train_epochs}")
        monitor.log_eval(engine.global_steps, epoch + 1, result)
        results.append(result)
        # Leftover micro-batches (in `carry`) are in no checkpoint yet: the next step saves.
        if not carry and run.after_epoch(engine, DataPosition(epoch + 1, 0)):
            return results
        if engine.global_steps >= total_steps:
            break
    print_rank_0(f"throughput over the run: {format_throughput(meter.report(overall=True))}")
    return results
