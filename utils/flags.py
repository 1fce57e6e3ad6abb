"""A typed setting that is also a command-line flag: declared once, as a dataclass field.

Each package declares its settings in its own `config.py` (`utils/data/config.py`, ...) as
dataclass fields made by `flag()`, with the default and the help text side by side. The
command line (`utils/cli/parse.py`) builds argparse from these fields, so a flag's name,
type, default, choices and help exist in exactly one place.
"""

from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any


def flag(
    default: Any = MISSING,
    help: str = "",
    *,
    default_factory: Any = MISSING,
    choices: tuple | None = None,
) -> Any:
    """A dataclass field that is the flag `--<field name>` (no default: a required flag)."""
    metadata = {"help": help, "choices": choices}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def declared_elsewhere(default: Any, by: str) -> Any:
    """A field filled from a flag that another library adds to the parser (`by` says which)."""
    return field(default=default, metadata={"declared_by": by})
