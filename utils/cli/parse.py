"""main.py's command line, built from Config's dataclass fields (each flag declared once).

Every field made by `utils.flags.flag()` becomes `--<field name>`, in an argument group per
settings group (utils.flags.build_parser). Flag names and defaults are DeepSpeed-Chat step
1's, so its launch scripts keep working; --config reads the same flags from a recipe file.
"""

from __future__ import annotations

import argparse

from utils.config import Config
from utils.flags import build_parser as build_settings_parser
from utils.flags import parse_settings

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
    parser = build_settings_parser(
        Config,
        "Supervised fine-tuning of a causal language model with DeepSpeed "
        "(DeepSpeed-Chat step 1 compatible command line).",
        GROUP_TITLES,
    )
    _add_deepspeed_arguments(parser)
    return parser


def _add_deepspeed_arguments(parser: argparse.ArgumentParser) -> None:
    """DeepSpeed's own --deepspeed/--deepspeed_config flags, added by DeepSpeed itself."""
    import deepspeed

    deepspeed.add_config_arguments(parser)


def parse_args(argv: list[str] | None = None) -> Config:
    return parse_settings(Config, build_parser(), argv)[0]
