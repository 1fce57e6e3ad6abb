"""Benchmark: build tokenised phase-1 SFT data for N rm-static-shaped rows.

Compares, in one run, this repository's pipeline (batched datasets.map with a fast
tokenizer, Arrow cache) with DeepSpeed-Chat's approach (tokenise and pad one row at
a time), then times a cache hit. Rows are sampled from real HH-RLHF dialogues.

    python bench/data_prep.py --rows 100000 \
        --dialogues ../shared/data/hh-rlhf-harmless-base/test.jsonl \
        --tokenizer ../shared/data/opt-tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from transformers import AutoTokenizer, GPT2Tokenizer

from utils.data.build import build_sft_data
from utils.data.config import DataConfig

EOT = "<|endoftext|>"


def load_opt_tokenizer(folder: str, work: str):
    """OPT's tokenizer from the raw metaseq files (renamed as HF expects) or an HF folder."""
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(folder)
    target = os.path.join(work, "opt-tokenizer")
    os.makedirs(target, exist_ok=True)
    shutil.copy(os.path.join(folder, "gpt2-vocab.json"), os.path.join(target, "vocab.json"))
    shutil.copy(os.path.join(folder, "gpt2-merges.txt"), os.path.join(target, "merges.txt"))
    return GPT2Tokenizer.from_pretrained(
        target,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
    )


def rm_static_rows(dialogues: str, n: int, seed: int) -> list[dict[str, str]]:
    """HH-RLHF dialogues cut into rm-static's prompt/chosen/rejected at the last Assistant turn."""
    pool = []
    with open(dialogues, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            cut = row["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
            rcut = row["rejected"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
            pool.append(
                {
                    "prompt": row["chosen"][:cut],
                    "chosen": row["chosen"][cut:],
                    "rejected": row["rejected"][rcut:],
                }
            )
    rng = random.Random(seed)
    return [dict(rng.choice(pool), id=i) for i in range(n)]


def write_source(rows: list[dict], folder: str) -> None:
    """A local copy of Dahoas/rm-static: data/train.jsonl and data/test.jsonl (10%)."""
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    n_test = len(rows) // 10
    for name, part in (("test", rows[:n_test]), ("train", rows[n_test:])):
        with open(os.path.join(folder, "data", f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)


def hh_data_config(args: argparse.Namespace, work: str, num_proc: int = 0, seed: int = 0):
    """(the OPT tokenizer, a DataConfig) for `args.rows` HH-RLHF dialogues written as
    rm-static rows under `work`, its cache there too (`args`: --dialogues, --tokenizer,
    --rows, --max_seq_len); build the data with `build_sft_data(cfg, tokenizer, None)`."""
    tokenizer = load_opt_tokenizer(args.tokenizer, work)
    source = os.path.join(work, "Dahoas", "rm-static")
    write_source(rm_static_rows(args.dialogues, args.rows, seed=seed), source)
    cfg = DataConfig(
        data_path=[source],
        data_split="10,0,0",
        data_output_path=os.path.join(work, "cache"),
        max_seq_len=args.max_seq_len,
        data_num_proc=num_proc,
    )
    return tokenizer, cfg


def one_row_at_a_time(folder: str, tokenizer, max_seq_len: int) -> int:
    """DeepSpeed-Chat step 1: read rows, then tokenise and pad each on its own."""
    examples = []
    for name in ("train", "test"):
        with open(os.path.join(folder, "data", f"{name}.jsonl"), encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                encoded = tokenizer(
                    row["prompt"] + row["chosen"] + EOT,
                    max_length=max_seq_len,
                    padding="max_length",
                    truncation=True,
                    return_tensors="pt",
                )
                examples.append(
                    (encoded["input_ids"].squeeze(0), encoded["attention_mask"].squeeze(0))
                )
    return len(examples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dialogues", default="../shared/data/hh-rlhf-harmless-base/test.jsonl")
    p.add_argument("--tokenizer", default="../shared/data/opt-tokenizer")
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument(
        "--num_proc", type=int, default=0, help="pipeline tokenising processes (0: auto)"
    )
    p.add_argument("--skip_baseline", action="store_true")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as work:
        tokenizer, cfg = hh_data_config(args, work, num_proc=args.num_proc)

        start = time.perf_counter()
        data = build_sft_data(cfg, tokenizer, None)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        hit = build_sft_data(cfg, tokenizer, None)
        warm = time.perf_counter() - start
        assert len(hit.train) == len(data.train)

        result = {
            "rows": args.rows,
            "train_rows": len(data.train),
            "eval_rows": len(data.eval),
            "train_tokens": data.train_tokens,
            "pipeline_cold_s": round(cold, 2),
            "cache_hit_s": round(warm, 3),
        }
        if not args.skip_baseline:
            start = time.perf_counter()
            one_row_at_a_time(cfg.data_path[0], tokenizer, args.max_seq_len)
            result["one_row_at_a_time_s"] = round(time.perf_counter() - start, 2)
            result["speedup_cold"] = round(result["one_row_at_a_time_s"] / cold, 1)
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
