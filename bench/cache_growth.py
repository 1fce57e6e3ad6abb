"""Benchmark: how much disk a data-cache build takes at its largest, as a multiple of its input.

The work folder of a build (load_dataset's Arrow copy of the input, the formatted and the
tokenised rows, the staged entry) is largest just before the entry is renamed into place.
This builds rm-static-shaped rows cut from real HH-RLHF dialogues and prints that size over
the input files' size: the factor utils/data/cache.py BUILD_GROWTH quotes when a full disk
stops a build.

    python bench/cache_growth.py --rows 2000 20000 \
        --dialogues ../shared/data/hh-rlhf-harmless-base/test.jsonl \
        --tokenizer ../shared/data/opt-tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import utils.data.cache as cache
from bench.data_prep import load_opt_tokenizer, rm_static_rows, write_source
from utils.data.build import build_sft_data
from utils.data.config import DataConfig
from utils.files import tree_bytes


def peak_work_bytes(source: str, cache_dir: str, tokenizer) -> int:
    """Bytes in the build's work folder when the staged entry is flushed (its largest)."""
    seen = []
    flush = cache.fsync_tree

    def measured(staged: str) -> None:
        seen.append(tree_bytes(os.path.dirname(staged)))
        flush(staged)

    cache.fsync_tree = measured
    try:
        cfg = DataConfig(data_path=[source], data_split="10,0,0", data_output_path=cache_dir)
        build_sft_data(cfg, tokenizer, None)
    finally:
        cache.fsync_tree = flush
    return seen[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--dialogues", default="../shared/data/hh-rlhf-harmless-base/test.jsonl")
    p.add_argument("--tokenizer", default="../shared/data/opt-tokenizer")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        tokenizer = load_opt_tokenizer(args.tokenizer, work)
        for rows in args.rows:
            source = os.path.join(work, f"rows-{rows}", "Dahoas", "rm-static")
            write_source(rm_static_rows(args.dialogues, rows, seed=0), source)
            peak = peak_work_bytes(source, os.path.join(work, f"cache-{rows}"), tokenizer)
            given = tree_bytes(source)
            print(
                json.dumps(
                    {
                        "rows": rows,
                        "input_bytes": given,
                        "peak_work_bytes": peak,
                        "growth": round(peak / given, 2),
                    }
                )
            )


if __name__ == "__main__":
    main()
