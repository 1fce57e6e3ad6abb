"""How much faster batched (left-padded) generation is than one prompt at a time.

Both variants run in this process on the same model and prompts and must give the
same answers; the figure is their time ratio, so machine speed cancels out.

    python bench/prompt_eval_batching.py --prompts 16 --batch_size 8 --max_new_tokens 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from utils.demo.tiny import EOT, build_opt_model, build_tokenizer
from utils.evaluate.generation import DecodingConfig, generate_answers
from utils.evaluate.prompts import PROMPT_SETS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--hidden_size", type=int, default=256)
    args = p.parse_args()

    corpus = [prompt for prompts in PROMPT_SETS.values() for prompt in prompts] * 10
    tokenizer = build_tokenizer(corpus, vocab_size=2000)
    tokenizer.padding_side = "left"
    model = build_opt_model(tokenizer, hidden_size=args.hidden_size, num_layers=4).eval()
    prompts = [PROMPT_SETS["English"][i % 6] + " " * (i % 5) for i in range(args.prompts)]

    seconds, answers = {}, {}
    for batch_size in (1, args.batch_size):
        cfg = DecodingConfig(max_new_tokens=args.max_new_tokens, batch_size=batch_size)
        start = time.perf_counter()
        answers[batch_size] = generate_answers(model, tokenizer, prompts, cfg, EOT)
        seconds[batch_size] = time.perf_counter() - start
    same = answers[1] == answers[args.batch_size]
    print(
        f"{args.prompts} prompts, {args.max_new_tokens} new tokens, {torch.get_num_threads()} "
        f"threads: one at a time {seconds[1]:.2f}s, batch {args.batch_size} "
        f"{seconds[args.batch_size]:.2f}s, speed-up x{seconds[1] / seconds[args.batch_size]:.2f}, "
        f"same answers: {same}"
    )


if __name__ == "__main__":
    main()
