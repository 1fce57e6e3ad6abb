"""Why rows were skipped: when every row of a file is unusable, the error says why.

Formatters return None for a row they cannot use and the format stage only counts those
rows. A file where that is every row is a mistake worth one precise line (a null prompt
column, empty answers, preference pairs whose answers are chat turns), not a later
"no eval rows" or "no optimizer step" that points at --data_split.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from datasets import Dataset

from utils.data.common import DataError
from utils.data.formats import LOCAL_SHAPES, ROLES

SAMPLE_ROWS = 1000  # rows looked at for the reasons; enough to name the usual one or two
TURN_COLUMNS = ("messages", "conversations")


def check_not_all_skipped(rows: Dataset, kept: int, columns: list[str], where: str) -> None:
    """Raise DataError naming `where` and the reasons when none of `rows` was usable."""
    if len(rows) == 0 or kept > 0:
        return
    sample = rows.select(range(min(len(rows), SAMPLE_ROWS)))
    counts = Counter(skip_reason(row, columns) for row in sample)
    reasons = ", ".join(f"{reason} ({n:,} rows)" for reason, n in counts.most_common(3))
    if len(counts) == 1:
        reasons = f"in every row {next(iter(counts))}"
    raise DataError(
        f"all {len(rows):,} rows of {where} were skipped because {reasons}. Each row needs "
        f"{_needs(columns)}; fix the file or leave it out"
    )


def required_columns(source_columns: list[str], catalogue_columns: tuple[str, ...] | None):
    """The columns a source's formatter reads: its catalogue entry's, or the local shape's."""
    if catalogue_columns is not None:
        return list(catalogue_columns)
    for required, _, _ in LOCAL_SHAPES:
        if required <= set(source_columns):
            return [c for c in source_columns if c in required]
    return []


def skip_reason(row: dict[str, Any], columns: list[str]) -> str:
    """The first thing wrong with `row` for a formatter that reads `columns`."""
    for name in columns:
        value = row.get(name)
        if value is None:
            return f"{name!r} is null"
        if name in TURN_COLUMNS:
            if reason := _turns_reason(name, value):
                return reason
        elif isinstance(value, str):
            if not value.strip():
                return f"{name!r} is empty"
        elif isinstance(value, list | tuple) and value and isinstance(value[0], dict):
            return (
                f"{name!r} is a list of chat turns, not text (for chat data write one "
                "'messages' column of role/content turns ending in the answer)"
            )
        else:
            return f"{name!r} is {type(value).__name__}, not text"
    return "no prompt and response could be read from them"


def _turns_reason(name: str, turns: Any) -> str | None:
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return f"{name!r} is not a list of role/content turns"
    roles = [str(t.get("role", t.get("from", ""))).lower() for t in turns]
    if unknown := sorted({r for r in roles if r not in ROLES}):
        return f"{name!r} has turns with unknown role {unknown[0]!r} (known: {', '.join(ROLES)})"
    if any(not isinstance(t.get("content", t.get("value")), str) for t in turns):
        return f"{name!r} has a turn without text content"
    if any(not t.get("content", t.get("value")).strip() for t in turns):
        return f"{name!r} has a turn with empty content"
    if "Assistant" not in [ROLES[r] for r in roles[1:]]:
        return f"{name!r} has no assistant turn after the first turn"
    return None


def _needs(columns: list[str]) -> str:
    if any(c in TURN_COLUMNS for c in columns):
        return "a list of role/content turns with an assistant answer after the first turn"
    if not columns:
        return "the columns its data set's formatter reads"
    return "non-empty text in " + ", ".join(repr(c) for c in columns)
