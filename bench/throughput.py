"""Benchmark: real tokens/s of (A) padding to max length, (B) the default, (C) packing, and
(R) a bare DeepSpeed loop on A's batches, in fp32 and (where the CPU has AMX-bf16) bf16.

One process, one tiny-but-not-trivial OPT (same seed for every variant), real HH-RLHF
dialogues tokenised by the real OPT tokenizer through this repository's data layer. A, B
and C run the training loop itself (utils/engine/loop.py's `train`, with its meter, monitor,
token-weighted loss, the loss path main.py picks and checkpoint hooks); R is
`deepspeed.initialize` + forward (the model's own loss) + backward + step and nothing else,
so A/R is what the loop costs at equal work. The loop's evaluations are left out (replaced
by a stub here). Each slice is timed in wall-clock seconds and in the process's CPU seconds
(user + system, all threads): on a machine shared with other jobs the wall clock stretches
with their load, CPU time much less so. The ids are then renumbered by
frequency into a small vocabulary (rare ones share an "unknown" id): the lengths stay
those of real dialogues, while a 50k-row output layer would make the tiny model's step
mostly one softmax and hide what padding costs. Timings on a shared CPU are noisy, so
the variants train in interleaved rounds (each round: a slice of every variant's epoch)
and the ratios are medians over rounds. Every variant trains on the same rows (the same
real tokens), so their final eval losses should agree within noise. The dtype axis adds
(B) in bf16 where the CPU has AMX-bf16 (utils/engine/precision.py; `--dtypes fp32,bf16`
forces it), through the DeepSpeed config main.py builds (torch.autocast at ZeRO-0 on a CPU).
`--compile` adds A and B with torch.compile'd models (engine.compile(), the plain loss, as
main.py's --compile): the first step's time (compilation) is reported apart, and the losses
must agree.

    python bench/throughput.py --dialogues ../shared/data/hh-rlhf-harmless-base/test.jsonl \
        --tokenizer ../shared/data/opt-tokenizer

The last line is `A/R=<ratio> B/A=<ratio> C/A=<ratio> bf16/fp32=<ratio>` (wall clock); the
line before it gives the same ratios in CPU time. `A-plain` (in --variants) is A with
--chunked_loss off.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import deepspeed
import torch
from transformers import OPTConfig, OPTForCausalLM

import utils.engine.loop as loop_module
from bench.data_prep import hh_data_config
from utils.checkpoint.checkpointer import build_checkpointer
from utils.checkpoint.config import CheckpointConfig
from utils.checkpoint.position import DataPosition
from utils.data.build import build_sft_data
from utils.data.config import BatchConfig
from utils.data.loaders import build_eval_loader, build_train_loader, choose_loader_workers
from utils.distributed import init_distributed
from utils.engine.accumulation import StepPlan
from utils.engine.config import EngineConfig, TrainConfig
from utils.engine.ds_config import build_ds_config
from utils.engine.loop import EvalResult, TrainLoop, evaluate, train
from utils.engine.precision import TORCH_DTYPES, cpu_bf16_capability
from utils.model.loss import choose_loss_path
from utils.observe.config import ObserveConfig
from utils.observe.progress import RunMonitor
from utils.observe.throughput import ThroughputMeter, build_flop_shape

VARIANTS = {
    # loss_on "all": DeepSpeed-Chat's loss, as the bare loop (R) computes it.
    "R": (
        "bare DeepSpeed loop, pad to max length",
        BatchConfig(pad_to_max_len=True, loss_on="all"),
        "fp32",
    ),
    "A": (
        "pad to max length (DeepSpeed-Chat)",
        BatchConfig(pad_to_max_len=True, loss_on="all"),
        "fp32",
    ),
    "A-plain": (
        "pad to max length, plain loss",
        BatchConfig(pad_to_max_len=True, loss_on="all"),
        "fp32",
    ),
    "B": ("default: length-grouped, pad to longest", BatchConfig(loss_on="all"), "fp32"),
    "C": ("packing", BatchConfig(packing=True, loss_on="all"), "fp32"),
    "B-bf16": ("default, bf16", BatchConfig(loss_on="all"), "bf16"),
    "A-compile": (
        "pad to max length, torch.compile",
        BatchConfig(pad_to_max_len=True, loss_on="all"),
        "fp32",
    ),
    "B-compile": ("default, torch.compile", BatchConfig(loss_on="all"), "fp32"),
}
PAD = 0  # after shrink_vocab


@dataclass
class Run:
    name: str
    engine: object
    loader: object
    steps: int
    loss: object = None  # the loss path main.py would pick (A, B, C)
    checkpointer: object = None
    batches: object = None  # R: the loader's batches, drawn as it trains
    done: int = 0
    rounds: list[float] = field(default_factory=list)  # real tokens per wall second, per round
    cpu_rounds: list[float] = field(default_factory=list)  # real tokens per CPU second
    real: int = 0
    padded: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    first_step_s: float = 0.0  # the first step alone (compilation, for compiled models)


def build_model(vocab: int, args, pad_id: int) -> OPTForCausalLM:
    torch.manual_seed(args.seed)
    config = OPTConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        word_embed_proj_dim=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        ffn_dim=4 * args.hidden,
        max_position_embeddings=args.max_seq_len,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=pad_id,
    )
    return OPTForCausalLM(config)


def shrink_vocab(train, eval_, vocab: int, pad_id: int):
    """Ids renumbered by frequency: pad -> 0, the vocab-2 most frequent -> 2.., the rest -> 1."""
    counts = Counter(i for ids in train["input_ids"] for i in ids)
    counts.pop(pad_id, None)
    new_id = {old: n + 2 for n, (old, _) in enumerate(counts.most_common(vocab - 2))}
    new_id[pad_id] = 0

    def renumber(row):
        return {"input_ids": [new_id.get(i, 1) for i in row["input_ids"]]}

    return train.map(renumber), eval_.map(renumber)


def start_run(name: str, train_rows, args, dist, work: str) -> Run:
    _, batch_cfg, dtype = VARIANTS[name]
    train_cfg = TrainConfig(per_device_train_batch_size=args.batch, learning_rate=args.lr)
    model = build_model(args.vocab, args, PAD)
    on_cuda = dist.device.type == "cuda"
    ds_config = build_ds_config(
        EngineConfig(), train_cfg, ObserveConfig(), 1, dtype, on_cuda=on_cuda
    )
    optimizer = build_optimizer(model, args)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    compiled = name.endswith("-compile")
    if compiled:
        engine.compile()
    loader = build_train_loader(
        train_rows, batch_cfg, micro_batch=args.batch, max_seq_len=args.max_seq_len,
        pad_token_id=PAD, seed=args.seed, rank=0, world_size=1,
        mask_dtype=TORCH_DTYPES[dtype],
        workers=choose_loader_workers(None, on_cuda=on_cuda, masked_packs=batch_cfg.packing),
        on_gpu=on_cuda,
    )  # fmt: skip
    run = Run(name, engine, loader, steps=len(loader))
    if name == "R":
        loader.sampler.set_epoch(0)  # the order train() gives A's first epoch
        run.batches = iter(loader)
        return run
    setting = "off" if name == "A-plain" else "auto"
    run.loss = choose_loss_path(
        model, setting, zero_stage=0, device_type=dist.device.type, fp32=False, compiled=compiled
    )
    folder = os.path.join(work, name)
    run.checkpointer = build_checkpointer(CheckpointConfig(), folder, {}, dist)
    return run


def build_optimizer(model, args) -> torch.optim.Optimizer:
    """What main.py builds on a CPU (DeepSpeed's CPU Adam), or torch's AdamW (--optimizer)."""
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if args.optimizer == "ds_cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=args.lr, betas=(0.9, 0.95))
    fused = args.optimizer == "torch_fused"
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=fused, foreach=not fused)


def train_slice(run: Run, steps: int, args, dist, eval_small) -> None:
    """`steps` optimizer steps: R's bare loop, or utils/engine/loop.py's `train` for the others.

    A run's very first step is timed apart (compilation, for compiled models) and left out
    of its throughput."""
    step_fn = bare_steps if run.name == "R" else loop_steps
    if run.done == 0:
        run.first_step_s, _, _, _ = step_fn(run, 1, args, dist, eval_small)
        run.done, steps = 1, steps - 1
    seconds, cpu_seconds, real, padded = step_fn(run, steps, args, dist, eval_small)
    run.done += steps
    run.real, run.padded = run.real + real, run.padded + padded
    run.seconds, run.cpu_seconds = run.seconds + seconds, run.cpu_seconds + cpu_seconds
    run.rounds.append(real / seconds)
    run.cpu_rounds.append(real / cpu_seconds)


def bare_steps(run: Run, steps: int, *_) -> tuple[float, float, int, int]:
    batches = [next(run.batches) for _ in range(steps)]  # collated before the clock starts
    started, cpu_started = time.perf_counter(), time.process_time()
    for batch in batches:
        out = run.engine(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            use_cache=False,
        )
        run.engine.backward(out.loss)
        run.engine.step()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    real = sum(int(b["seq_lens"].sum()) for b in batches)
    return seconds, cpu_seconds, real, sum(b["input_ids"].numel() for b in batches)


def skip_evaluation(loop, epoch: int, label: str) -> EvalResult:
    """Stands in for the loop's evaluations, which are not training time."""
    return EvalResult(loss=0.0, perplexity=1.0, tokens=0)


def loop_steps(run: Run, steps: int, args, dist, eval_small) -> tuple[float, float, int, int]:
    """The loop from where the last slice stopped (as a resume would), timed around `train`
    with its evaluations stubbed out; tokens counted by its own meter."""
    # Every micro-batch before the last is full: `done` of them are done * batch rows in.
    run.checkpointer.start = DataPosition(0, run.done * args.batch, args.batch)
    meter = ThroughputMeter(build_flop_shape(run.engine.module, False), None, dist.device, 1)
    total = run.done + steps
    plan = StepPlan(micro_batches_per_epoch=run.steps, accumulation=1, epochs=1, max_steps=total)
    loop = TrainLoop(
        engine=run.engine, train_loader=run.loader, eval_loader=eval_small, dist=dist, plan=plan,
        monitor=RunMonitor(None, total, start_step=run.done, stream=io.StringIO(), enabled=True),
        meter=meter, checkpointer=run.checkpointer, loss=run.loss,
    )  # fmt: skip
    train_cfg = TrainConfig(per_device_train_batch_size=args.batch, learning_rate=args.lr)
    loop_module.evaluate_and_report = skip_evaluation
    with contextlib.redirect_stdout(io.StringIO()):  # the loop's own prints
        started, cpu_started = time.perf_counter(), time.process_time()
        train(loop, train_cfg)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return seconds, cpu_seconds, int(meter.total["real"]), int(meter.total["padded"])


def load_data(args, work: str):
    tokenizer, cfg = hh_data_config(args, work, seed=args.seed)
    return tokenizer, build_sft_data(cfg, tokenizer, None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dialogues", default="../shared/data/hh-rlhf-harmless-base/test.jsonl")
    p.add_argument("--tokenizer", default="../shared/data/opt-tokenizer")
    p.add_argument("--rows", type=int, default=250, help="rows sampled (10%% held out)")
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", default="R,A,B,C")
    p.add_argument("--dtypes", default="auto", help="fp32[,bf16]; auto: bf16 where AMX-bf16")
    p.add_argument("--compile", action="store_true", help="add A and B with torch.compile")
    p.add_argument(
        "--optimizer",
        choices=("ds_cpu_adam", "torch_foreach", "torch_fused"),
        default="ds_cpu_adam",
        help="ds_cpu_adam: what main.py uses on a CPU",
    )
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()

    has_bf16, why = cpu_bf16_capability()
    dtypes = ("fp32", "bf16") if has_bf16 else ("fp32",)
    dtypes = dtypes if args.dtypes == "auto" else tuple(args.dtypes.split(","))
    names = args.variants.split(",")
    names += ["B-bf16"] if "bf16" in dtypes else []
    names += ["A-compile", "B-compile"] if args.compile else []
    dist = init_distributed()
    with tempfile.TemporaryDirectory() as work:
        tokenizer, data = load_data(args, work)
        train_rows, eval_ = shrink_vocab(data.train, data.eval, args.vocab, tokenizer.pad_token_id)
        runs = [start_run(name, train_rows, args, dist, work) for name in names]
        params = sum(p.numel() for p in runs[0].engine.module.parameters())
        print(
            f"OPT {params / 1e6:.1f}M parameters, {len(data.train)} train rows "
            f"({data.train_tokens} tokens), {len(data.eval)} eval rows, "
            f"seq {args.max_seq_len}, batch {args.batch}, {torch.get_num_threads()} threads, "
            f"optimizer {args.optimizer}; bf16: {why}"
        )
        # train() evaluates after every slice (not timed): a few rows keep that short.
        geometry = {"pad_token_id": PAD, "rank": 0, "world_size": 1}
        geometry["on_gpu"] = dist.device.type == "cuda"
        eval_small = build_eval_loader(
            eval_.select(range(min(8, len(eval_)))), BatchConfig(loss_on="all"), micro_batch=args.batch,
            **geometry,
        )  # fmt: skip
        for r in range(args.rounds):
            # Rotate who goes first so a noisy neighbour does not always hit the same variant.
            for run in runs[r % len(runs) :] + runs[: r % len(runs)]:
                train_slice(
                    run, (r + 1) * run.steps // args.rounds - run.done, args, dist, eval_small
                )
        eval_loader = build_eval_loader(
            eval_, BatchConfig(loss_on="all"), micro_batch=args.batch, **geometry
        )
        reference = choose_loss_path(
            runs[0].engine.module, "off", zero_stage=0, device_type=dist.device.type,
            fp32=False, compiled=False,
        )  # fmt: skip
        losses = {run.name: evaluate(run.engine, eval_loader, dist, reference).loss for run in runs}

    by_name = {run.name: run for run in runs}
    for run in runs:
        print(
            f"{run.name:9s} {VARIANTS[run.name][0]:40s} {run.real / run.seconds:8.0f} real "
            f"tokens/s (median round {statistics.median(run.rounds):.0f}), "
            f"{1 - run.real / run.padded:5.1%} padding, {run.steps} steps, first step "
            f"{run.first_step_s:.2f} s, {run.real / run.cpu_seconds:6.0f} real tokens per CPU "
            f"second, eval loss {losses[run.name]:.4f}"
            + (f", loss {run.loss.describe().split(':')[0]}" if run.loss else "")
        )

    def ratio(top: str, bottom: str, cpu: bool = False) -> str:
        if top not in by_name or bottom not in by_name:
            return "n/a"
        a, b = by_name[top], by_name[bottom]
        top_rounds, bottom_rounds = (a.cpu_rounds, b.cpu_rounds) if cpu else (a.rounds, b.rounds)
        pairs = zip(top_rounds, bottom_rounds, strict=True)
        return f"{statistics.median(t / b for t, b in pairs):.2f}"

    def ratios(cpu: bool) -> str:
        return (
            f"A/R={ratio('A', 'R', cpu)} B/A={ratio('B', 'A', cpu)} C/A={ratio('C', 'A', cpu)} "
            f"bf16/fp32={ratio('B-bf16', 'B', cpu)}"
        )

    if args.compile:
        print(f"compiled/eager: A={ratio('A-compile', 'A')} B={ratio('B-compile', 'B')}")
    if "A-plain" in by_name:
        print(
            f"chunked/plain loss (A): {ratio('A', 'A-plain')} (CPU time {ratio('A', 'A-plain', True)})"
        )
    print(f"CPU time: {ratios(cpu=True)} (load average {os.getloadavg()[0]:.1f})")
    print(ratios(cpu=False))


if __name__ == "__main__":
    main()
