"""Prompt sets for comparing a baseline and a fine-tuned model.

The built-in sets are DeepSpeed-Chat's six evaluation questions in three
languages. Every prompt is framed as the data layer frames training rows
(" Human: <question> Assistant:", leading space included): a byte-level BPE
tokenises " Human" and "Human" differently, and the model should see what it
was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

from utils.errors import UserError

PROMPT_FRAME = " Human: {} Assistant:"
QUESTIONS: dict[str, list[str]] = {
    "English": [
        "Please tell me about Microsoft in a few sentences.",
        "Explain the moon landing to a 6 year old in a few sentences.",
        "Write a short poem about a wise frog.",
        "Who was president of the United States in 1955?",
        "How does a telescope work?",
        "Why do birds migrate south for the winter?",
    ],
    "Chinese": [
        "请用几句话介绍一下微软。",
        "请用几句话向一个6岁的孩子解释登月。",
        "写一首关于一只聪明的青蛙的短诗。",
        "1955年的美国总统是谁?",
        "望远镜是如何工作的?",
        "为什么鸟类冬天要向南迁徙?",
    ],
    "Japanese": [
        "マイクロソフトについて簡単に教えてください。",
        "6歳の子どもに月面着陸を短い文で説明してください。",
        "賢いカエルについての短い詩を書いてください。",
        "1955年のアメリカ合衆国大統領は誰ですか?",
        "望遠鏡はどのように機能しますか?",
        "鳥が冬に南へ渡るのはなぜですか?",
    ],
}


def frame_prompt(text: str) -> str:
    """Wrap a bare question in PROMPT_FRAME; framed prompts keep the user's exact text."""
    if text.strip().startswith("Human:") and text.rstrip().endswith("Assistant:"):
        return text.rstrip()
    return PROMPT_FRAME.format(text.strip())


PROMPT_SETS = {
    language: [frame_prompt(q) for q in questions] for language, questions in QUESTIONS.items()
}


def load_prompts(path: str | Path) -> list[str]:
    """Framed prompts from a text file (one per line) or JSONL (objects with a "prompt" field).

    A file is read as JSONL when it ends in .jsonl or its first non-blank line is a
    JSON object; blank lines are skipped either way.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file; give a text file with one prompt a line")
    lines = [(number, line) for number, line in _read_lines(path) if line.strip()]
    if not lines:
        raise UserError(
            f"--prompts {path}: the file has no prompts; write one prompt a line "
            '(or JSONL rows with a "prompt" field)'
        )
    if path.suffix == ".jsonl" or lines[0][1].lstrip().startswith("{"):
        texts = [_prompt_field(path, number, line) for number, line in lines]
    else:
        texts = [line for _, line in lines]
    return [frame_prompt(text) for text in texts]


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line; a line that is not UTF-8 is named, not a traceback."""
    lines = []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            lines.append((number, raw.decode("utf-8")))
        except UnicodeDecodeError as err:
            raise UserError(
                f"--prompts {path}: line {number} is not UTF-8 text (byte "
                f"{raw[err.start]:#04x} at column {err.start + 1}); save the file as UTF-8"
            ) from None
    return lines


def _prompt_field(path: Path, number: int, line: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise UserError(f"--prompts {path}: line {number} is not valid JSON ({error})") from None
    prompt = row.get("prompt") if isinstance(row, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(
            f'--prompts {path}: line {number} has no non-empty "prompt" string field; '
            'write rows like {"prompt": "..."}'
        )
    return prompt
