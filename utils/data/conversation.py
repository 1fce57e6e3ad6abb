"""Rows -> conversations ([{"role", "content"}, ...]) for rendering through a chat template.

Every shape the data layer reads becomes one list of system/user/assistant messages:
`messages`/`conversations` columns keep all their turns in order (role/content or
ShareGPT from/value); prompt/response pairs (the DeepSpeed-Chat hub sets, Alpaca,
prompt+completion) lose their " Human:"/" Assistant:" scaffolding, a multi-exchange
prompt (hh-rlhf style) becoming its turns. A row that cannot be a conversation gives a
Skip: the caller skips it and counts it by `reason`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Message = dict[str, str]

ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}
KNOWN_ROLES = ", ".join(ROLES)

# " Human:"/"\n\nHuman:" and " Assistant:" markers; \b keeps "NonHuman:" from matching.
SPEAKER = re.compile(r"\s*\b(Human|Assistant):")
SPEAKER_ROLES = {"Human": "user", "Assistant": "assistant"}

RESPONSE_COLUMNS = ("chosen", "response", "completion")


@dataclass(frozen=True)
class Skip:
    """A row left out: `reason` is the category the summary counts, `detail` this row's specifics."""

    reason: str
    detail: str = ""


def to_conversation(
    row: Mapping[str, Any], system_prompt: str | None = None
) -> list[Message] | Skip:
    """One raw row of any shape the data layer reads -> a validated conversation, or Skip.

    The system turn comes from, in order: the conversation's own leading system turn, the
    row's `system` column, then `system_prompt` (e.g. --system_prompt).
    """
    system = row.get("system") if is_text(row.get("system")) else (system_prompt or None)
    for column in ("messages", "conversations"):
        if column in row:
            return from_turns(row[column], system)
    if "instruction" in row and "output" in row:
        context = row.get("input")
        instruction = row["instruction"]
        if is_text(instruction) and is_text(context):
            instruction = f"{instruction}\n\n{context}"
        return checked([("user", instruction), ("assistant", row["output"])], system)
    for column in RESPONSE_COLUMNS:
        if "prompt" in row and column in row:
            return from_prompt_response(row["prompt"], row[column], system)
    return Skip("unrecognised row", f"columns {sorted(row)}")


def from_turns(turns: Any, system: str | None = None) -> list[Message] | Skip:
    """Role/content or ShareGPT from/value turns, all kept in order, roles normalised."""
    if not isinstance(turns, list) or not turns:
        return Skip("not a conversation", f"expected a non-empty list of turns, got {turns!r:.80}")
    pairs = []
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, Mapping):
            return Skip("not a conversation", f"turn {number} is {turn!r:.80}, not a mapping")
        name = turn.get("role", turn.get("from"))
        role = ROLES.get(name.lower()) if isinstance(name, str) else None
        if role is None:
            return Skip("unknown role", f"turn {number} has role {name!r}; known: {KNOWN_ROLES}")
        pairs.append((role, turn.get("content", turn.get("value"))))
    return checked(pairs, system)


def from_prompt_response(
    prompt: Any, response: Any, system: str | None = None
) -> list[Message] | Skip:
    """A prompt/response pair: " Human: q Assistant:" + " a" -> user q, assistant a.

    A prompt with several Human/Assistant exchanges becomes those turns; a prompt without
    any marker is the user's turn as it stands.
    """
    if not isinstance(prompt, str):
        return Skip("turn not text", f"the prompt is {type(prompt).__name__}, not text")
    parts = SPEAKER.split(prompt)
    head, speakers, texts = parts[0], parts[1::2], parts[2::2]
    if not speakers:
        return checked([("user", prompt.strip()), ("assistant", strip(response))], system)
    if head.strip():
        return Skip("roles out of order", f"text before the first 'Human:': {head.strip()!r:.80}")
    pairs = [(SPEAKER_ROLES[s], t.strip()) for s, t in zip(speakers, texts, strict=True)]
    # The trailing "Assistant:" is the slot the response fills.
    if pairs[-1] == ("assistant", ""):
        pairs.pop()
    elif pairs[-1][0] == "assistant":
        return Skip(
            "roles out of order",
            "the prompt ends inside an assistant turn, so the response would continue it",
        )
    return checked([*pairs, ("assistant", strip(response))], system)


def checked(pairs: list[tuple[str, Any]], system: str | None) -> list[Message] | Skip:
    """(role, content) pairs -> messages, or Skip naming the first problem.

    Turns must alternate user/assistant after an optional leading system turn; trailing
    user turns are dropped, as nothing after the last answer is trained.
    """
    for number, (role, content) in enumerate(pairs, 1):
        if not isinstance(content, str):
            return Skip("turn not text", f"turn {number} ({role}) is {type(content).__name__}")
        if not content.strip():
            return Skip("empty turn", f"turn {number} ({role}) is empty")
    offset = 1 if pairs and pairs[0][0] == "system" else 0
    for number, (role, _) in enumerate(pairs[offset:], offset + 1):
        expected = "user" if (number - offset) % 2 else "assistant"
        if role != expected:
            return Skip(
                "roles out of order",
                f"turn {number} is {role} where {expected} was expected (turns alternate "
                "user/assistant after an optional leading system turn)",
            )
    if not any(role == "assistant" for role, _ in pairs):
        return Skip("no assistant turn", f"roles: {[role for role, _ in pairs]}")
    while pairs[-1][0] == "user":
        pairs = pairs[:-1]
    if system and not offset:
        pairs = [("system", system), *pairs]
    return [{"role": role, "content": content} for role, content in pairs]


def is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def strip(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value
