"""Cheap checks of a model folder before any expensive work: its weight files and tokenizer.

A truncated or garbage weights file otherwise ends in a library traceback after the data
is built, and a folder without tokenizer files gets a degenerate tokenizer from
transformers (no vocabulary: every text becomes the empty string) that trains "fine" to
perplexity 1.0. Both are found here from file headers and the tokenizer validation loads.
"""

from __future__ import annotations

import json
import os
import zipfile

from safetensors import SafetensorError, safe_open
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from utils.model.config import ModelConfig

# What save_pretrained writes: one file, or an index naming the shards.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Text every tokenizer of a model trained on English-like data turns into several ids.
PROBE_TEXT = " Human: What is the capital of France? Assistant: Paris."
# Models pad their embedding rows past the tokenizer (to multiples of 64 or 128, reserved
# ids: phi-2 905 rows, DeepSeek 2,385); a tokenizer below this share is another model's.
MIN_VOCAB_SHARE = 0.9


def weight_problems(path: str, flag: str = "--model_name_or_path") -> list[str]:
    """Problems with a local model folder's weight files (a hub name is checked on download).

    Reads only file headers: a safetensors header parses only when the file holds every
    byte it announces, and a zip-format .bin keeps its directory at the end of the file.
    """
    if not os.path.isdir(path):
        return []
    present = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
    if not present:
        return [
            f"{flag} {path!r} holds no weights (none of {', '.join(WEIGHT_FILES)}); "
            "copy the model's weight files into it, or point at the folder save_pretrained wrote."
        ]
    index = next((name for name in present if name.endswith(".index.json")), None)
    if index and not any(name == index.removesuffix(".index.json") for name in present):
        return _shard_problems(os.path.join(path, index))
    return [p for name in present if (p := _file_problem(os.path.join(path, name)))]


def _shard_problems(index: str) -> list[str]:
    try:
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return [f"{index} is not a readable weight index ({err}); copy it again from the source."]
    folder = os.path.dirname(index)
    problems = []
    for shard in shards:
        file = os.path.join(folder, shard)
        if not os.path.isfile(file):
            problems.append(f"{file} is missing (listed in {index}); copy every shard it lists.")
        elif problem := _file_problem(file):
            problems.append(problem)
    return problems


def _file_problem(file: str) -> str | None:
    fix = "it is truncated or corrupt; copy it again (its size must match the source's)."
    if file.endswith(".index.json"):
        return None
    if file.endswith(".safetensors"):
        try:
            with safe_open(file, framework="pt"):
                return None
        except (SafetensorError, OSError) as err:
            return f"{file} is not a readable safetensors file ({err}): {fix}"
    with open(file, "rb") as f:
        zipped = f.read(2) == b"PK"  # torch >= 1.6 saves zip files; older ones pickle
    if os.path.getsize(file) == 0 or (zipped and not zipfile.is_zipfile(file)):
        return f"{file} is not a readable PyTorch weights file: {fix}"
    return None


def tokenizer_problems(
    cfg: ModelConfig, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
) -> list[str]:
    """Problems with the tokenizer training would use: it turns text into ids, and its
    vocabulary covers the model's embedding rows (less padding)."""
    flag, source, fix = _tokenizer_source(cfg)
    if reason := unusable_tokenizer(tokenizer):
        return [f"{flag} {source!r} has no usable tokenizer ({reason}); {fix}"]
    rows = getattr(config.get_text_config(), "vocab_size", None)
    if isinstance(rows, int) and len(tokenizer) < MIN_VOCAB_SHARE * rows:
        return [
            f"{flag} {source!r}: its tokenizer has {len(tokenizer):,} tokens but the model has "
            f"{rows:,} embedding rows, so it is not this model's tokenizer; pass the model's "
            "own with --tokenizer_name_or_path."
        ]
    return []


def unloadable_tokenizer(cfg: ModelConfig, err: Exception) -> str:
    """The problem when the tokenizer cannot be loaded at all (`err`: what loading raised)."""
    flag, source, fix = _tokenizer_source(cfg)
    return f"{flag} {source!r}: cannot load a tokenizer ({err}); {fix}"


def _tokenizer_source(cfg: ModelConfig) -> tuple[str, str, str]:
    source = cfg.tokenizer_path
    flag = "--tokenizer_name_or_path" if cfg.tokenizer_name_or_path else "--model_name_or_path"
    fix = (
        f"copy the model's tokenizer files into {source!r} (tokenizer.save_pretrained), "
        "or pass --tokenizer_name_or_path with the folder or hub name of its tokenizer."
    )
    return flag, source, fix


def unusable_tokenizer(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Why a loaded tokenizer cannot tokenise text, or None when it can."""
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if not ids:
        return f"its vocabulary has {len(tokenizer)} entries and it turns text into no ids"
    if tokenizer.unk_token_id is not None and set(ids) == {tokenizer.unk_token_id}:
        return "it turns every word into the unknown token"
    return None
