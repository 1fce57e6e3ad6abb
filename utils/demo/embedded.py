"""The embedded CPU default: a tiny OPT, its tokenizer and a small instruction data set.

Everything is generated here, offline and deterministically, so a newcomer can watch a
real fine-tuning run on a laptop. The data is a fixed knowledge base (capitals, sums,
opposites, animal sounds, colours, counting) asked in several phrasings, in DeepSpeed-Chat's
" Human: ... Assistant:" format: small enough for a tiny model to learn in a minute or two,
so the before/after comparison shows that fine-tuning worked, not only that it ran. The
same knowledge as multi-turn conversations (data_chat/, utils/demo/chat_data.py) serves the
chat-template run; the tokenizer knows ChatML's <|im_start|> and <|im_end|> for it.

    python -m utils.demo.embedded --out embedded
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Russia": "Moscow",
    "Greece": "Athens",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
    "Cuba": "Havana",
    "Chile": "Santiago",
    "India": "Delhi",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "up": "down",
    "day": "night",
    "happy": "sad",
    "old": "new",
    "open": "closed",
    "light": "dark",
    "early": "late",
    "full": "empty",
    "strong": "weak",
}
SOUNDS = {
    "dog": "woof",
    "cat": "meow",
    "cow": "moo",
    "duck": "quack",
    "sheep": "baa",
    "lion": "roar",
    "owl": "hoot",
    "frog": "ribbit",
    "horse": "neigh",
    "bee": "buzz",
}
COLORS = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "a banana": "yellow",
    "coal": "black",
    "a tomato": "red",
    "an orange": "orange",
    "a plum": "purple",
}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Several phrasings per task, so the model learns the task rather than one string.
TEMPLATES = {
    "capital": [
        "What is the capital of {x}?",
        "Which city is the capital of {x}?",
        "Tell me the capital of {x}.",
    ],
    "sum": ["What is {a} plus {b}?", "How much is {a} plus {b}?", "Add {a} and {b}."],
    "opposite": [
        "What is the opposite of {x}?",
        "Give me the opposite of {x}.",
        "Which word means the opposite of {x}?",
    ],
    "sound": ["What sound does a {x} make?", "What does a {x} say?", "How does a {x} sound?"],
    "color": ["What color is {x}?", "Which color is {x}?", "Tell me the color of {x}."],
    "count": ["Count from one to {x}.", "Please count to {x}.", "Count up to {x}."],
}

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


def qa_pairs() -> list[tuple[str, str, str]]:
    """Every (task, question, answer) of the knowledge base, in every phrasing."""
    pairs = []
    for country, city in CAPITALS.items():
        pairs += [
            ("capital", t.format(x=country), f"The capital of {country} is {city}.")
            for t in TEMPLATES["capital"]
        ]
    for a in range(6):
        for b in range(6):
            pairs += [
                ("sum", t.format(a=a, b=b), f"{a} plus {b} is {a + b}.") for t in TEMPLATES["sum"]
            ]
    for word, opposite in OPPOSITES.items():
        pairs += [
            ("opposite", t.format(x=word), f"The opposite of {word} is {opposite}.")
            for t in TEMPLATES["opposite"]
        ]
    for animal, sound in SOUNDS.items():
        pairs += [
            ("sound", t.format(x=animal), f"A {animal} says {sound}.") for t in TEMPLATES["sound"]
        ]
    for thing, color in COLORS.items():
        pairs += [
            ("color", t.format(x=thing), f"{thing[0].upper()}{thing[1:]} is {color}.")
            for t in TEMPLATES["color"]
        ]
    for n in range(2, 10):
        counted = ", ".join(NUMBER_WORDS[1 : n + 1])
        pairs += [
            ("count", t.format(x=NUMBER_WORDS[n]), f"{counted[0].upper()}{counted[1:]}.")
            for t in TEMPLATES["count"]
        ]
    return pairs


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
    from utils.demo.chat_data import (
        DEMO_CONVERSATIONS,
        add_chat_tokens,
        build_chat_rows,
        chat_corpus,
    )
    from utils.demo.tiny import EOT, build_opt_model, build_tokenizer

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
