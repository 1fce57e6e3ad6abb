"""A typed setting that is also a command-line flag: declared once, as a dataclass field.

Each package declares its settings in its own `config.py` (`utils/data/config.py`, ...) as
dataclass fields made by `flag()`, with the default and the help text side by side. Both
commands' parsers are built here from a tree of such dataclasses (`build_parser`): each flag
field becomes `--<field name>` with its type, default, choices and help, and each field whose
type is a dataclass is a group of flags. So a flag exists in exactly one place; a setting both
commands take is declared by one and borrowed by the other with `shared_flag()`. Both also
take --config, a recipe file that fills the same fields (utils/recipe.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from utils.recipe import Recipe, add_config_argument, read_recipe


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


def shared_flag(settings: type, name: str) -> Any:
    """The flag `name` exactly as the dataclass `settings` declares it (default, help,
    choices): a setting another command takes too, so it is declared once."""
    declared = settings.__dataclass_fields__[name]
    if declared.default_factory is not MISSING:
        return field(default_factory=declared.default_factory, metadata=declared.metadata)
    return field(default=declared.default, metadata=declared.metadata)


def declared_elsewhere(default: Any, by: str) -> Any:
    """A field filled from a flag that is not built from it (`by` says what adds the flag)."""
    return field(default=default, metadata={"declared_by": by})


@dataclass(kw_only=True)
class RecipeSettings:
    """Where values came from besides the command line (the run summary says it)."""

    config: Recipe | None = declared_elsewhere(None, by="utils/recipe.py")


NOT_GIVEN = object()  # stands in for a flag the command line did not give


def build_parser(
    settings: type, description: str, titles: dict[str, str] | None = None
) -> argparse.ArgumentParser:
    """A parser with one flag per flag field of `settings`, each group's flags under its
    title (`titles`: group field name -> title, in --help order; other groups follow, titled
    by their field name)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_config_argument(parser)
    add_flags(parser, settings, titles or {})
    return parser


def add_flags(parser, settings: type, titles: dict[str, str]) -> None:
    """One argument per flag field of the dataclass `settings`; a group per nested one."""
    hints = typing.get_type_hints(settings)
    order = list(titles)
    for f in sorted(fields(settings), key=lambda f: _rank(f.name, order)):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            add_flags(parser.add_argument_group(titles.get(f.name, f.name)), kind, {})
        elif "help" in f.metadata:
            parser.add_argument(f"--{f.name}", **_argument(f, kind))


def parse_settings(
    settings: type, parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[Any, set[str]]:
    """`argv` (and the recipe its --config names) as a `settings` object, and the names of
    the flags the user gave (on the command line or in the recipe)."""
    argv = list(argv) if argv is not None else None
    recipe = read_recipe(parser, argv)
    namespace = argparse.Namespace(**{a.dest: NOT_GIVEN for a in parser._actions})
    parsed = vars(parser.parse_args(argv, namespace))
    given = {name for name, value in parsed.items() if value is not NOT_GIVEN}
    values = {a.dest: parsed[a.dest] if a.dest in given else a.default for a in parser._actions}
    if recipe is not None:  # what the file set and the command line kept
        recipe = dataclasses.replace(
            recipe, values={k: v for k, v in recipe.values.items() if k not in given}
        )
        given |= set(recipe.values)
    return fill(settings, {**values, "config": recipe}), given - {"config"}


def fill(settings: type, values: dict[str, Any]) -> Any:
    """An instance of `settings` with each field (nested groups too) taken from `values`."""
    hints = typing.get_type_hints(settings)
    kwargs = {}
    for f in fields(settings):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = fill(hints[f.name], values)
        elif f.name in values and ("help" in f.metadata or "declared_by" in f.metadata):
            kwargs[f.name] = values[f.name]
    return settings(**kwargs)


def _argument(f: Field, kind: object) -> dict:
    argument: dict = {"dest": f.name, "help": f.metadata["help"] or None}
    if f.default is MISSING and f.default_factory is MISSING:
        argument["required"] = True
    else:
        argument["default"] = f.default if f.default is not MISSING else f.default_factory()
    if kind is bool:
        return {**argument, "action": "store_true"}
    if typing.get_origin(kind) is list:
        return {**argument, "nargs": "*", "type": typing.get_args(kind)[0]}
    if isinstance(kind, types.UnionType):  # `int | None`: the flag's type is the non-None one
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if f.metadata.get("choices"):
        argument["choices"] = f.metadata["choices"]
    return {**argument, "type": kind}


def _rank(name: str, order: list[str]) -> int:
    return order.index(name) if name in order else len(order)
