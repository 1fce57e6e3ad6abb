"""Benchmark: what collating a training micro-batch costs the training process, without and
with loader worker processes, for padded batches (the default) and packed rows with masks.

Real HH-RLHF dialogues tokenised by the OPT tokenizer through this repository's data layer,
micro-batch 8 at --max_seq_len 512. For each kind of batch, (A) the training process reads
the rows (one Arrow read) and collates them itself; (B) two spawn-started workers do it
and the training process only receives the batch. Between two batches the training
process sleeps --step_ms, standing for a GPU step during which it waits (B's workers work
meanwhile; on a CPU they would compete with training for the cores instead). The variants
run in interleaved rounds and the figures are medians over rounds: milliseconds of the
training process per micro-batch (its time in next(), the sleep excluded).

    python bench/loader_workers.py --dialogues ../shared/data/hh-rlhf-harmless-base/test.jsonl \
        --tokenizer ../shared/data/opt-tokenizer

The last line is `padded_ms=<A> packed_ms=<A> padded_workers/own=<B/A> packed_workers/own=<B/A>`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import torch

from bench.data_prep import hh_data_config
from utils.data.build import build_sft_data
from utils.data.config import BatchConfig
from utils.data.loaders import build_train_loader, choose_loader_workers, open_batches

KINDS = {"padded": BatchConfig(loss_on="all"), "packed": BatchConfig(loss_on="all", packing=True)}


def load_rows(args, work: str):
    tokenizer, cfg = hh_data_config(args, work)
    return tokenizer.pad_token_id, build_sft_data(cfg, tokenizer, None).train


def endless(loader, stack: contextlib.ExitStack):
    """The loader's batches epoch after epoch, each epoch's workers stopped with `stack`."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from stack.enter_context(open_batches(loader))
        epoch += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dialogues", default="../shared/data/hh-rlhf-harmless-base/test.jsonl")
    p.add_argument("--tokenizer", default="../shared/data/opt-tokenizer")
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", type=int, default=40, help="micro-batches per variant a round")
    p.add_argument("--step_ms", type=float, default=30.0, help="the GPU step it waits for")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as work, contextlib.ExitStack() as stack:
        pad_id, rows = load_rows(args, work)
        variants = {}
        for kind, batch in KINDS.items():
            for workers in (0, 2):
                loader = build_train_loader(
                    rows, batch, micro_batch=args.micro_batch, max_seq_len=args.max_seq_len,
                    pad_token_id=pad_id, seed=0, rank=0, world_size=1,
                    mask_dtype=torch.bfloat16,
                    workers=choose_loader_workers(workers, on_cuda=False, masked_packs=True),
        on_gpu=False,
    )  # fmt: skip
                batches = endless(loader, stack)
                next(batches)  # workers started, not timed
                variants[kind, workers] = batches
        times: dict[tuple, list[float]] = {key: [] for key in variants}
        for _ in range(args.rounds):
            for key, batches in variants.items():
                spent = 0.0
                for _ in range(args.batches):
                    time.sleep(args.step_ms / 1000)
                    started = time.perf_counter()
                    next(batches)
                    spent += time.perf_counter() - started
                times[key].append(1000 * spent / args.batches)
        ms = {key: statistics.median(t) for key, t in times.items()}
        for (kind, workers), value in ms.items():
            who = f"{workers} workers" if workers else "own process"
            print(f"{kind:7} {who:11} {value:7.2f} ms of the training process per micro-batch")
        print(
            f"padded_ms={ms['padded', 0]:.2f} packed_ms={ms['packed', 0]:.2f} "
            f"padded_workers/own={ms['padded', 2] / ms['padded', 0]:.2f} "
            f"packed_workers/own={ms['packed', 2] / ms['packed', 0]:.2f}"
        )


if __name__ == "__main__":
    main()
