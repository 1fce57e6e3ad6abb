"""--config FILE: a recipe, a YAML or JSON mapping of flag names to values.

The recipe fills the same settings the flags do: its values replace the defaults, and
flags on the command line override it (dataclass defaults < recipe < command line). Each
value goes through its flag's own conversion and choices, as if typed on the command line,
so a recipe cannot set what the command line could not. The mapping is flat, as the
command line is: flag names are unique across groups, and the groups are code layout.
Every problem in the file is reported at once, naming the file, before any work is done.
"""

from __future__ import annotations

import argparse
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.errors import ConfigError

FORMATS = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}
TYPE_NAMES = {int: "an integer", float: "a number", str: "a string"}


@dataclass(frozen=True)
class Recipe:
    """A --config file as read: its path, and each flag it set that the command line did
    not override (name -> value, converted as the flag's own type)."""

    path: str
    values: dict[str, Any]

    def describe(self, width: int = 86) -> list[str]:
        """`path: --flag value ...`, the values written as on a command line, in lines of
        about `width` characters."""
        items = [f"--{name} {_show(value)}" for name, value in self.values.items()]
        lines = [f"{self.path}:"]
        for item in items or ["nothing (the command line overrode every value)"]:
            if len(lines[-1]) + 1 + len(item) > width:
                lines.append(item)
            else:
                lines[-1] += " " + item
        return lines


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="A recipe: a YAML (.yaml, .yml) or JSON (.json) mapping of flag names (no "
        "dashes) to values, e.g. 'learning_rate: 9.65e-6'. It replaces the defaults; flags "
        "on the command line override it.",
    )


def read_recipe(parser: argparse.ArgumentParser, argv: list[str] | None) -> Recipe | None:
    """The recipe `argv`'s --config names (None without one), checked against `parser`'s
    flags; its values become `parser`'s defaults, so the command line still overrides them."""
    finder = argparse.ArgumentParser(add_help=False)
    add_config_argument(finder)
    path = finder.parse_known_args(argv)[0].config
    if path is None:
        return None
    # argparse lists its flags only in _actions; DeepSpeed's own (--deepspeed_config) are
    # there too, so a recipe can set them like any other.
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    values, problems = {}, []
    for key, value in load_recipe(path).items():
        name = str(key)
        if name == "config":
            problems.append("config: a recipe cannot name another recipe")
        elif name not in actions:
            nearest = difflib.get_close_matches(name, actions, n=1, cutoff=0)
            problems.append(f"{name} is not a flag; did you mean {nearest[0]}?")
        elif (problem := _convert(actions[name], value, values)) is not None:
            problems.append(problem)
    if problems:
        raise ConfigError(
            "\n".join(
                [f"--config {path}: the recipe cannot be used:", *(f"  - {p}" for p in problems)]
            )
        )
    for name, value in values.items():
        actions[name].default = value
        actions[name].required = False  # the recipe gave it
    return Recipe(path, values)


def load_recipe(path: str) -> dict:
    """The file's mapping (an empty file is an empty recipe)."""
    kind = FORMATS.get(Path(path).suffix.lower())
    if kind is None:
        raise ConfigError(f"--config {path}: unknown extension; use .yaml, .yml or .json")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"--config {path} cannot be read ({err.strerror}).") from None
    if kind == "json":
        try:
            recipe = json.loads(text) if text.strip() else {}
        except ValueError as err:
            raise ConfigError(f"--config {path} is not valid JSON: {err}") from None
    else:
        import yaml  # only for a YAML recipe

        try:
            recipe = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {path} is not valid YAML: {err}") from None
    if not isinstance(recipe, dict):
        raise ConfigError(
            f"--config {path} must hold a mapping of flag names to values, e.g. "
            f"'max_seq_len: 512'; it holds a {type(recipe).__name__}"
        )
    return recipe


def _convert(action: argparse.Action, value: Any, values: dict) -> str | None:
    """Put `value` into `values` as the flag would parse it; otherwise the problem."""
    name = action.dest
    if action.nargs == 0:  # a switch (store_true): on or off
        if not isinstance(value, bool):
            return f"{name} {value!r}: a switch; give true or false"
        values[name] = value
        return None
    if value is None:
        if action.default is not None:
            return f"{name}: null, but the flag has no unset state (default {action.default!r})"
        values[name] = None
        return None
    many = action.nargs in ("*", "+")
    if isinstance(value, dict) or (isinstance(value, list) and not many):
        return f"{name} {value!r}: give one value, not a {type(value).__name__}"
    kind = action.type or str
    what = TYPE_NAMES.get(kind, getattr(kind, "__name__", "a value"))
    converted = []
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, bool):  # no number or text, though Python's int(True) is 1
            return f"{name}: true/false is not {what} (YAML reads yes, no, on, off as true/false)"
        if isinstance(item, dict | list):
            return f"{name} {value!r}: a list of plain values, not of {type(item).__name__}s"
        try:
            item = kind(str(item))
        except (TypeError, ValueError):
            return f"{name} {item!r}: not {what}"
        if action.choices is not None and item not in action.choices:
            return f"{name} {item!r}: choose from {', '.join(map(str, action.choices))}"
        converted.append(item)
    values[name] = converted if many else converted[0]
    return None


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "unset"
    if isinstance(value, list):
        return " ".join(str(v) for v in value) or "(none)"
    return str(value)
