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

from utils.data.chat import ChatTemplate, render
from utils.data.conversation import (
    KNOWN_ROLES,
    ROLES,
    SPEAKER,
    Message,
    Skip,
    from_prompt_response,
)
from utils.errors import UserError

PROMPT_FRAME = " Human: {} Assistant:"
Prompt = str | list[Message]  # a question (bare or framed), or a conversation so far
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
    """Framed prompts (DeepSpeed-Chat's format) from a --prompts file (see read_prompts)."""
    return [dschat_prompt(prompt) for prompt in read_prompts(path)]


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a text file (one per line) or JSONL (objects with a "prompt" string or a
    "messages" list of role/content turns ending with the user's).

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
        return [_prompt_field(path, number, line) for number, line in lines]
    return [line for _, line in lines]


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


def _prompt_field(path: Path, number: int, line: str) -> Prompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise UserError(f"--prompts {path}: line {number} is not valid JSON ({error})") from None
    if isinstance(row, dict) and "messages" in row:
        return _messages(row["messages"], f"--prompts {path}: line {number}")
    prompt = row.get("prompt") if isinstance(row, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(
            f'--prompts {path}: line {number} has no non-empty "prompt" string field nor a '
            '"messages" list; write rows like {"prompt": "..."} or '
            '{"messages": [{"role": "user", "content": "..."}]}'
        )
    return prompt


def _messages(turns: object, where: str) -> list[Message]:
    """A conversation to continue: optional system turn, then user/assistant turns, the user's
    last (the models write the next assistant turn)."""
    fix = 'write {"messages": [{"role": "user", "content": "..."}, ...]} ending with a user turn'
    if not isinstance(turns, list) or not turns:
        raise UserError(f'{where}: "messages" must be a non-empty list of turns; {fix}')
    messages = []
    for number, turn in enumerate(turns, 1):
        name = turn.get("role", turn.get("from")) if isinstance(turn, dict) else None
        role = ROLES.get(name.lower()) if isinstance(name, str) else None
        content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
        if role is None or not isinstance(content, str) or not content.strip():
            raise UserError(
                f"{where}: turn {number} needs a role ({KNOWN_ROLES}) and non-empty text "
                f"content, got {turn!r:.80}; {fix}"
            )
        messages.append({"role": role, "content": content})
    offset = 1 if messages[0]["role"] == "system" else 0
    roles = [m["role"] for m in messages[offset:]]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]
    if roles != expected or not roles or roles[-1] != "user":
        raise UserError(
            f"{where}: turns must alternate user/assistant after an optional system turn and "
            f"end with the user's, got {[m['role'] for m in messages]}; {fix}"
        )
    return messages


def dschat_prompt(prompt: Prompt) -> str:
    """DeepSpeed-Chat framing: " Human: q Assistant:", earlier exchanges in the same frame."""
    if isinstance(prompt, str):
        return frame_prompt(prompt)
    if prompt[0]["role"] == "system":
        raise UserError(
            "a --prompts conversation has a system turn, which DeepSpeed-Chat's format cannot "
            "write; pass --chat_template (the template the model was trained with)"
        )
    speakers = {"user": "Human", "assistant": "Assistant"}
    turns = "".join(f" {speakers[m['role']]}: {m['content'].strip()}" for m in prompt)
    return turns + " Assistant:"


def chat_prompt(prompt: Prompt, system_prompt: str | None) -> list[Message]:
    """A prompt as the conversation a chat template renders: a bare question is the user's
    turn, a framed one (" Human: … Assistant:") its turns; system_prompt opens a
    conversation that has no system turn."""
    if isinstance(prompt, list):
        messages = list(prompt)
    elif SPEAKER.search(prompt):
        found = from_prompt_response(prompt, "-")
        if isinstance(found, Skip):
            raise UserError(f"prompt {prompt!r:.80}: {found.reason}: {found.detail}")
        messages = found[:-1]  # without the placeholder reply
    else:
        messages = [{"role": "user", "content": prompt.strip()}]
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def describe_prompt(prompt: Prompt) -> str:
    """What the report shows: the question, or each turn of a conversation on its own line."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def render_prompts(
    prompts: list[Prompt], tokenizer, template: ChatTemplate | None, system_prompt: str | None
) -> list[str]:
    """Each prompt as the text the model continues: DeepSpeed-Chat's frame (template None),
    or the template's rendering with the generation prompt (its special tokens included)."""
    if template is None:
        return [dschat_prompt(prompt) for prompt in prompts]
    return [
        render(
            chat_prompt(prompt, system_prompt), tokenizer, template.text, add_generation_prompt=True
        )
        for prompt in prompts
    ]
