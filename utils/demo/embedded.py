"""The embedded CPU default: a tiny OPT, its tokenizer and a small instruction data set.

Everything is generated here, offline and deterministically, so a newcomer can watch a
real fine-tuning run on a laptop. The data is a fixed knowledge base (capitals, sums,
opposites, animal sounds, colours, counting: utils/demo/knowledge.py) asked in several
phrasings, in DeepSpeed-Chat's " Human: ... Assistant:" format: small enough for a tiny
model to learn in a minute or two, so the before/after comparison shows that fine-tuning
worked, not only that it ran. The same knowledge as multi-turn conversations (data_chat/,
utils/demo/chat_data.py) serves the chat-template run; the tokenizer knows ChatML's
<|im_start|> and <|im_end|> for it.

    python -m utils.demo.embedded --out embedded
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile

from utils.demo.chat_data import DEMO_CONVERSATIONS, add_chat_tokens, build_chat_rows, chat_corpus
from utils.demo.knowledge import qa_pairs
from utils.demo.tiny import EOT, build_opt_model, build_tokenizer

# Questions of the kinds it is trained on, with the answer a correct reply contains.
DEMO_PROMPTS = [
    ("What is the capital of France?", "Paris"),
    ("Which city is the capital of Japan?", "Tokyo"),
    ("What is 3 plus 4?", "3 plus 4 is 7"),
    ("How much is 5 plus 2?", "7"),
    ("What is the opposite of hot?", "cold"),
    ("What sound does a cow make?", "moo"),
    ("What color is the sky?", "blue"),
    ("Count from one to five.", "two, three, four, five."),
]


def as_row(question: str, answer: str) -> dict[str, str]:
    return {"prompt": f" Human: {question} Assistant:", "chosen": f" {answer}"}


def build_rows(seed: int = 0, eval_fraction: float = 0.1) -> tuple[list[dict], list[dict]]:
    """Train and eval rows: a seeded shuffle, eval being a held-out tenth of the phrasings."""
    rows = [as_row(q, a) for _, q, a in qa_pairs()]
    random.Random(seed).shuffle(rows)
    n_eval = max(1, int(len(rows) * eval_fraction))
    return rows[n_eval:], rows[:n_eval]


def build_embedded(out: str, seed: int = 0) -> dict[str, str]:
    """Write data/, data_chat/, tiny-opt/ (untrained model + tokenizer), prompts.txt and
    chat_prompts.jsonl under `out`."""
    paths = {
        "data": os.path.join(out, "data"),
        "chat_data": os.path.join(out, "data_chat"),
        "model": os.path.join(out, "tiny-opt"),
        "chat_prompts": os.path.join(out, "chat_prompts.jsonl"),
        "prompts": os.path.join(out, "prompts.txt"),  # written last: marks a complete folder
    }
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(out, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".building-", dir=out)
    try:
        train, evaluation = build_rows(seed)
        chat_train, chat_eval = build_chat_rows(seed)
        for folder, splits in (
            ("data", (train, evaluation)),
            ("data_chat", (chat_train, chat_eval)),
        ):
            os.makedirs(os.path.join(staging, folder))
            for name, rows in zip(("train.jsonl", "eval.jsonl"), splits, strict=True):
                write_jsonl(os.path.join(staging, folder, name), rows)
        corpus = [r["prompt"] + r["chosen"] + EOT for r in train] + chat_corpus(chat_train)
        tokenizer = build_tokenizer(corpus, vocab_size=512)
        add_chat_tokens(tokenizer)  # before the model is sized: each is one trained embedding
        model = build_opt_model(
            tokenizer, hidden_size=128, num_layers=4, num_heads=4, max_positions=512, seed=seed
        )
        model.save_pretrained(os.path.join(staging, "tiny-opt"))
        tokenizer.save_pretrained(os.path.join(staging, "tiny-opt"))
        write_jsonl(
            os.path.join(staging, "chat_prompts.jsonl"),
            [{"messages": messages} for messages, _ in DEMO_CONVERSATIONS],
        )
        with open(os.path.join(staging, "prompts.txt"), "w") as f:
            f.writelines(f"{q}\n" for q, _ in DEMO_PROMPTS)
        for key in ("data", "chat_data", "model"):  # publish each piece by rename
            if os.path.exists(paths[key]):
                shutil.rmtree(paths[key])
        for key, name in (
            ("data", "data"),
            ("chat_data", "data_chat"),
            ("model", "tiny-opt"),
            ("chat_prompts", "chat_prompts.jsonl"),
            ("prompts", "prompts.txt"),
        ):
            os.replace(os.path.join(staging, name), paths[key])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="embedded", help="Folder to write (default: ./embedded).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, path in build_embedded(args.out, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
