"""Benchmark: what rounding batch widths up to a multiple costs in padding, on real lengths.

Every new sequence width a GPU sees pays first-use costs (allocator growth, kernel choice,
lazy kernel loading), so fewer widths mean a faster start; rounding to a coarser multiple
gives fewer widths but more padded positions, each a position of real matrix work.

HH-RLHF harmless-base dialogues cut as Dahoas/rm-static (prompt + chosen), through the OPT
tokenizer and this repository's data pipeline (utils/data), batched as training batches
them by default: length-grouped micro-batches of 8 (utils/data/sampler.py), --max_seq_len
512, each padded to its longest row rounded up to the multiple. Three epochs' orders.

    python bench/pad_widths.py --rows 2000 \
        --dialogues ../shared/data/hh-rlhf-harmless-base/test.jsonl \
        --tokenizer ../shared/data/opt-tokenizer

Last line: `pad64/pad8=R widths64/widths8=R` (padded positions, distinct widths).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from bench.data_prep import hh_data_config
from utils.arithmetic import round_up
from utils.data.build import build_sft_data
from utils.data.loaders import row_lengths
from utils.data.sampler import LengthGroupedSampler

MULTIPLES = (8, 16, 32, 64, 128)


def train_lengths(args: argparse.Namespace) -> list[int]:
    with tempfile.TemporaryDirectory() as work:
        tokenizer, cfg = hh_data_config(args, work)
        return row_lengths(build_sft_data(cfg, tokenizer, None).train)


def batch_widths(lengths: list[int], micro_batch: int, epochs: int) -> list[tuple[int, int]]:
    """(longest row, rows) of every micro-batch of `epochs` epochs, in training's order."""
    sampler = LengthGroupedSampler(lengths, micro_batch, seed=1234)
    batches = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches += [(max(lengths[i] for i in b), len(b)) for b in sampler.global_batches()]
    return batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--dialogues", default="../shared/data/hh-rlhf-harmless-base/test.jsonl")
    p.add_argument("--tokenizer", default="../shared/data/opt-tokenizer")
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    lengths = train_lengths(args)
    batches = batch_widths(lengths, args.micro_batch, args.epochs)
    real = args.epochs * sum(lengths)
    print(
        f"{len(lengths)} rows, mean length {sum(lengths) / len(lengths):.0f}, micro-batch "
        f"{args.micro_batch}, {len(batches)} micro-batches over {args.epochs} epochs"
    )
    padded, widths = {}, {}
    for multiple in MULTIPLES:
        shapes = [min(round_up(longest, multiple), args.max_seq_len) for longest, _ in batches]
        padded[multiple] = sum(w * rows for w, (_, rows) in zip(shapes, batches, strict=True))
        widths[multiple] = len(set(shapes))
        print(
            f"multiple {multiple:3d}: {widths[multiple]:3d} distinct widths, padded positions "
            f"{padded[multiple] / real:.3f}x the real tokens ({padded[multiple] / padded[8]:.3f}x "
            "multiple 8's)"
        )
    print(f"pad64/pad8={padded[64] / padded[8]:.3f} widths64/widths8={widths[64] / widths[8]:.3f}")


if __name__ == "__main__":
    main()
