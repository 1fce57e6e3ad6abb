"""The command line, built from the settings' dataclass fields (each flag declared once).

Every field made by `utils.flags.flag()` becomes `--<field name>`, in an argument group per
settings group, with its type, default, choices and help taken from the field. Flag names and
defaults are DeepSpeed-Chat step 1's, so its launch scripts keep working.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, Field, fields

from utils.config import Config

# Argument-group titles, in --help order (the Config field of each group).
GROUP_TITLES = {
    "data": "data",
    "batch": "batching and loss",
    "model": "model",
    "lora": "LoRA",
    "train": "training",
    "engine": "engine",
    "checkpoint": "checkpointing",
    "observe": "logging",
    "planner": "memory planner",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Supervised fine-tuning of a causal language model with DeepSpeed "
        "(DeepSpeed-Chat step 1 compatible command line).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(Config)
    for group, title in GROUP_TITLES.items():
        add_flags(parser.add_argument_group(title), hints[group])
    _add_deepspeed_arguments(parser)
    return parser


def add_flags(group, settings: type) -> None:
    """One argument per flag field of the dataclass `settings`."""
    hints = typing.get_type_hints(settings)
    for f in fields(settings):
        if "help" in f.metadata:
            group.add_argument(f"--{f.name}", **_argument(f, hints[f.name]))


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


def _add_deepspeed_arguments(parser: argparse.ArgumentParser) -> None:
    """DeepSpeed's own --deepspeed/--deepspeed_config flags, added by DeepSpeed itself."""
    import deepspeed

    deepspeed.add_config_arguments(parser)


def parse_args(argv: list[str] | None = None) -> Config:
    args = vars(build_parser().parse_args(argv))
    hints = typing.get_type_hints(Config)
    groups = {}
    for group in GROUP_TITLES:
        settings = hints[group]
        groups[group] = settings(
            **{f.name: args[f.name] for f in fields(settings) if f.name in args}
        )
    return Config(**groups)
