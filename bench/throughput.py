"""Benchmark: real tokens/s of (A) padding to max length, (B) the default, (C) packing.

One process, one tiny-but-not-trivial OPT (same seed for every variant), real HH-RLHF
dialogues tokenised by the real OPT tokenizer through this repository's data layer, and
the training step of utils/train.py under DeepSpeed. The ids are then renumbered by
frequency into a small vocabulary (rare ones share an "unknown" id): the lengths stay
those of real dialogues, while a 50k-row output layer would make the tiny model's step
mostly one softmax and hide what padding costs. Timings on a shared CPU are noisy, so
the variants train in interleaved rounds (each round: a slice of every variant's epoch)
and the ratios are medians over rounds. Every variant trains on the same rows (the same
real tokens), so their final eval losses should agree within noise. Then (B) in bf16
against fp32 for a few steps on the same batches: does bf16 train (same loss within
bf16 rounding) and is it faster on this CPU?

    python bench/throughput.py --dialogues ../shared/data/hh-rlhf-harmless-base/test.jsonl \
        --tokenizer ../shared/data/opt-tokenizer

The last line is `B/A=<ratio> C/A=<ratio>`.
"""

from __future__ import annotations

import argparse
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

from bench.data_prep import load_opt_tokenizer, rm_static_rows, write_source
from utils.data.build import build_sft_data
from utils.data.config import BatchConfig, DataConfig
from utils.data.loaders import build_eval_loader, build_train_loader
from utils.distributed import init_distributed
from utils.engine.accumulation import accumulation_windows, micro_batch_loss
from utils.engine.config import EngineConfig, TrainConfig
from utils.engine.ds_config import build_ds_config
from utils.engine.loop import evaluate, forward_nll

VARIANTS = {
    "A": (
        "pad to max length (DeepSpeed-Chat)",
        BatchConfig(pad_to_max_len=True, loss_on="all"),
        "fp32",
    ),
    "B": ("default: length-grouped, pad to longest", BatchConfig(loss_on="all"), "fp32"),
    "C": ("packing", BatchConfig(packing=True, loss_on="all"), "fp32"),
}
BF16 = ("default, bf16", BatchConfig(loss_on="all"), "bf16")
PAD = 0  # after shrink_vocab


@dataclass
class Run:
    name: str
    engine: object
    windows: object
    steps: int
    done: int = 0
    rounds: list[float] = field(default_factory=list)  # real tokens/s per round
    real: int = 0
    padded: int = 0
    seconds: float = 0.0
    last_loss: float = float("nan")


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


def start_run(name: str, train, args) -> Run:
    _, batch_cfg, dtype = BF16 if name == "B-bf16" else VARIANTS[name]
    train_cfg = TrainConfig(per_device_train_batch_size=args.batch, learning_rate=args.lr)
    model = build_model(args.vocab, args, PAD)
    ds_config = build_ds_config(EngineConfig(), train_cfg, 1, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    loader = build_train_loader(
        train, batch_cfg, args.batch, args.max_seq_len, PAD, args.seed, 0, 1, dtype
    )
    windows = accumulation_windows(loader, 1, torch.device("cpu"), carry=[])
    return Run(name, engine, windows, steps=len(loader))


def train_slice(run: Run, steps: int) -> None:
    """`steps` optimizer steps of utils/train.py's loop (accumulation 1), timed."""
    real = padded = 0
    started = time.perf_counter()
    for _ in range(steps):
        window = next(run.windows)
        [batch] = window.batches
        nll, count = forward_nll(run.engine, batch, False)
        run.engine.backward(micro_batch_loss(nll, count, window, "token", 1), scale_wrt_gas=False)
        run.engine.step()
        real += int(batch["seq_lens"].sum())
        padded += batch["input_ids"].numel()
    seconds = time.perf_counter() - started
    run.done += steps
    run.real, run.padded, run.seconds = run.real + real, run.padded + padded, run.seconds + seconds
    run.rounds.append(real / seconds)
    run.last_loss = float(nll.detach()) / max(count, 1)


def compare_bf16(train, args) -> str:
    """bf16 against fp32, (B) batches, the same first steps: speed ratio and losses."""
    runs = [start_run(name, train, args) for name in ("B", "B-bf16")]
    for run in runs:
        train_slice(run, 1)  # warm-up (first-call allocations), not timed below
        run.rounds = []
        train_slice(run, args.bf16_steps)
    fp32, bf16 = runs
    return (
        f"bf16/fp32 real tokens/s (B, steps 2-{1 + args.bf16_steps}) = "
        f"{bf16.rounds[0] / fp32.rounds[0]:.2f}; training loss at step {1 + args.bf16_steps}: "
        f"fp32 {fp32.last_loss:.4f}, bf16 {bf16.last_loss:.4f}"
    )


def load_data(args, work: str):
    tokenizer = load_opt_tokenizer(args.tokenizer, work)
    source = os.path.join(work, "Dahoas", "rm-static")
    write_source(rm_static_rows(args.dialogues, args.rows, seed=args.seed), source)
    cfg = DataConfig(
        data_path=[source],
        data_split="10,0,0",
        data_output_path=os.path.join(work, "cache"),
        max_seq_len=args.max_seq_len,
    )
    return tokenizer, build_sft_data(cfg, tokenizer)


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
    p.add_argument("--variants", default="A,B,C")
    p.add_argument("--bf16_steps", type=int, default=2, help="0 skips the bf16 comparison")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()

    dist = init_distributed()
    with tempfile.TemporaryDirectory() as work:
        tokenizer, data = load_data(args, work)
        train, eval_ = shrink_vocab(data.train, data.eval, args.vocab, tokenizer.pad_token_id)
        runs = [start_run(name, train, args) for name in args.variants.split(",")]
        params = sum(p.numel() for p in runs[0].engine.module.parameters())
        print(
            f"OPT {params / 1e6:.1f}M parameters, {len(data.train)} train rows "
            f"({data.train_tokens} tokens), {len(data.eval)} eval rows, "
            f"seq {args.max_seq_len}, batch {args.batch}, {torch.get_num_threads()} threads"
        )
        for r in range(args.rounds):
            # Rotate who goes first so a noisy neighbour does not always hit the same variant.
            for run in runs[r % len(runs) :] + runs[: r % len(runs)]:
                train_slice(run, (r + 1) * run.steps // args.rounds - run.done)
        eval_loader = build_eval_loader(eval_, args.batch, PAD, 0, 1)
        losses = {run.name: evaluate(run.engine, eval_loader, dist, False).loss for run in runs}
        bf16_line = compare_bf16(train, args) if args.bf16_steps else ""

    by_name = {run.name: run for run in runs}
    for run in runs:
        print(
            f"{run.name:7s} {VARIANTS[run.name][0]:42s} {run.real / run.seconds:8.0f} real tokens/s "
            f"(median round {statistics.median(run.rounds):.0f}), "
            f"{1 - run.real / run.padded:5.1%} padding, {run.steps} steps, "
            f"{run.real} real tokens, eval loss {losses[run.name]:.4f}"
        )

    def ratio(top: str, bottom: str) -> str:
        if top not in by_name or bottom not in by_name:
            return "n/a"
        rounds = zip(by_name[top].rounds, by_name[bottom].rounds, strict=True)
        return f"{statistics.median(t / b for t, b in rounds):.2f}"

    if args.bf16_steps:
        print(bf16_line)
    print(f"B/A={ratio('B', 'A')} C/A={ratio('C', 'A')}")


if __name__ == "__main__":
    main()
