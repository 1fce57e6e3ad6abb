"""Row formatters: one raw row -> Example(prompt, response), or None to skip it.

Prompts read " Human: <question> Assistant:" and responses " <answer>" (leading
space), DeepSpeed-Chat's convention. A formatter returns None when a field it needs
is missing or empty; the format stage counts those rows as skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from datasets import Dataset

from utils.data.common import DataError


class Example(NamedTuple):
    prompt: str
    response: str  # the preferred answer ("chosen") of preference data


Formatter = Callable[[dict[str, Any]], Example | None]


def is_text(*values: Any) -> bool:
    return all(isinstance(v, str) and v.strip() for v in values)


def first(values: Any, key: str | None = None) -> Any:
    """values[0] (or values[0][key]) when present, else None."""
    if not isinstance(values, list | tuple) or not values:
        return None
    item = values[0]
    if key is None:
        return item
    return item.get(key) if isinstance(item, dict) else None


def question_answer(question: Any, answer: Any) -> Example | None:
    """The common case: wrap a bare question and answer in Human/Assistant turns."""
    if not is_text(question, answer):
        return None
    return Example(f" Human: {question} Assistant:", f" {answer}")


def verbatim(prompt: Any, response: Any) -> Example | None:
    """Fields already in prompt/response form (e.g. "\\n\\nHuman: ... Assistant:")."""
    if not is_text(prompt, response):
        return None
    return Example(prompt, response)


# Local files: recognised column shapes ---------------------------------------------

ROLES = {
    "user": "Human",
    "human": "Human",
    "assistant": "Assistant",
    "gpt": "Assistant",
    "bot": "Assistant",
    "model": "Assistant",
    "system": "System",
}


def format_turns(turns: Any) -> Example | None:
    """Role/content (or ShareGPT from/value) turns; trains on the last assistant turn."""
    if not isinstance(turns, list):
        return None
    rendered: list[tuple[str, str]] = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        role = ROLES.get(str(turn.get("role", turn.get("from", ""))).lower())
        content = turn.get("content", turn.get("value"))
        if role is None or not is_text(content):
            return None
        rendered.append((role, content))
    last = max((i for i, (role, _) in enumerate(rendered) if role == "Assistant"), default=0)
    if last == 0:
        return None
    prompt = "".join(f" {role}: {content}" for role, content in rendered[:last])
    return Example(prompt + " Assistant:", f" {rendered[last][1]}")


def format_alpaca(row: dict[str, Any]) -> Example | None:
    context = row.get("input")
    question = (
        f"{row.get('instruction')}\n\n{context}" if is_text(context) else row.get("instruction")
    )
    return question_answer(question, row.get("output"))


# (required columns, formatter, how the shape is described in errors); first match wins.
LOCAL_SHAPES: list[tuple[set[str], Formatter, str]] = [
    ({"messages"}, lambda r: format_turns(r["messages"]), "messages"),
    ({"conversations"}, lambda r: format_turns(r["conversations"]), "conversations"),
    ({"instruction", "output"}, format_alpaca, "instruction+input+output (Alpaca)"),
    (
        {"prompt", "chosen"},
        lambda r: verbatim(r["prompt"], r["chosen"]),
        "prompt+chosen(+rejected)",
    ),
    ({"prompt", "response"}, lambda r: verbatim(r["prompt"], r["response"]), "prompt+response"),
    (
        {"prompt", "completion"},
        lambda r: verbatim(r["prompt"], r["completion"]),
        "prompt+completion",
    ),
]


def detect_format(columns: list[str], source: str) -> Formatter:
    """The formatter for a local file's columns, or an error naming what was found."""
    for required, formatter, _ in LOCAL_SHAPES:
        if required <= set(columns):
            return formatter
    shapes = ", ".join(desc for _, _, desc in LOCAL_SHAPES)
    raise DataError(
        f"{source}: no recognised columns; found {sorted(columns)}. Expected one of: {shapes}"
    )


def format_rows(rows: Dataset, formatter: Formatter, cache_file: str) -> tuple[Dataset, int]:
    """Raw rows -> {"prompt", "response"} rows and how many were skipped as unusable."""

    def format_batch(batch: dict[str, list]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"prompt": [], "response": []}
        for values in zip(*batch.values(), strict=True):
            example = formatter(dict(zip(batch, values, strict=True)))
            if example is not None:
                out["prompt"].append(example.prompt)
                out["response"].append(example.response)
        return out

    if len(rows) == 0:  # map() on no rows cannot infer the new columns
        return Dataset.from_dict({"prompt": [], "response": []}), 0
    formatted = rows.map(
        format_batch,
        batched=True,
        remove_columns=rows.column_names,
        cache_file_name=cache_file,
        load_from_cache_file=False,
        desc="Formatting",
    )
    return formatted, len(rows) - len(formatted)
