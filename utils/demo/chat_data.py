"""Multi-turn demo conversations in `messages` form, for the embedded demo's chat-template run.

The single-turn demo's knowledge base (utils/demo/knowledge.py: capitals, sums, opposites,
sounds, colours, counting), its question/answer pairs dealt into conversations of one to
three exchanges, a third of them opened by a system turn. Deterministic for a seed; the tiny
demo model learns it as it learns the single-turn data (the template file sits next to this
module).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from utils.demo.knowledge import qa_pairs

TEMPLATE_PATH = Path(__file__).with_name("chatml.jinja")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer in one sentence.",
)

# Multi-turn prompts for prompt_eval: the conversation so far, and what a right reply contains.
DEMO_CONVERSATIONS: list[tuple[list[dict[str, str]], str]] = [
    ([{"role": "user", "content": "What is the capital of France?"}], "Paris"),
    (
        [
            {"role": "system", "content": SYSTEM_PROMPTS[0]},
            {"role": "user", "content": "What sound does a cow make?"},
        ],
        "moo",
    ),
    (
        [
            {"role": "user", "content": "What is 3 plus 4?"},
            {"role": "assistant", "content": "3 plus 4 is 7."},
            {"role": "user", "content": "What is the opposite of hot?"},
        ],
        "cold",
    ),
    # A system turn and an earlier exchange. Not two earlier exchanges: after those the
    # 1M-parameter demo model starts copying the context (measured: 3 of 8 questions right).
    (
        [
            {"role": "system", "content": SYSTEM_PROMPTS[1]},
            {"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "2 plus 2 is 4."},
            {"role": "user", "content": "What sound does a dog make?"},
        ],
        "woof",
    ),
]


def build_chat_rows(
    seed: int = 0, eval_fraction: float = 0.1, passes: int = 2
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and eval rows {"messages": [...]} of one to three exchanges each.

    Eval holds out a tenth of the Q/A pairs (as the single-turn demo holds out phrasings).
    Every training pair appears `passes` times, each time among other exchanges: with one
    context per pair a tiny model recalls answers from the conversation so far instead of
    reading the question.
    """
    rng = random.Random(seed)
    pairs = [(q, a) for _, q, a in qa_pairs()]
    rng.shuffle(pairs)
    n_eval = max(1, int(len(pairs) * eval_fraction))
    train = [row for _ in range(passes) for row in conversations(pairs[n_eval:], rng)]
    return train, conversations(pairs[:n_eval], rng)


def conversations(pairs: list[tuple[str, str]], rng: random.Random) -> list[dict[str, Any]]:
    """The pairs, shuffled, dealt into conversations; a third open with a system turn."""
    pairs = rng.sample(pairs, len(pairs))
    rows = []
    while pairs:
        size = rng.choice((1, 2, 3))
        exchange, pairs = pairs[:size], pairs[size:]
        messages = []
        if rng.random() < 1 / 3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for question, answer in exchange:
            messages += [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        rows.append({"messages": messages})
    return rows


def chat_corpus(rows: list[dict[str, Any]]) -> list[str]:
    """Every turn's text, to train the demo tokenizer on (the ChatML tokens are added whole)."""
    return [m["role"] + "\n" + m["content"] for row in rows for m in row["messages"]]


def add_chat_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer ChatML's control tokens, each one token (before sizing the model)."""
    tokenizer.add_tokens(list(CHATML_TOKENS), special_tokens=True)


def chat_template() -> str:
    return TEMPLATE_PATH.read_text(encoding="utf-8")
