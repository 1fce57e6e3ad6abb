"""Data sources: parse --data_path entries, resolve them to a catalogue entry and a location, load rows."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from datasets import Dataset, load_dataset

from utils.data.common import DataError
from utils.data.formats import Formatter, detect_format
from utils.data.local import (
    BUILDERS,
    EVAL_SPLITS,
    find_split_files,
    fingerprint_path,
    is_saved_dataset,
    load_local,
)
from utils.data.registry import DATASETS, CatalogueEntry

JSONFILE_DIR = "data"  # local/jsonfile reads data/train.json and data/eval.json (DeepSpeed-Chat)


@dataclass(frozen=True)
class Source:
    name: str  # as the user wrote it, without the weight
    weight: float  # up/down-sampling factor of its train rows
    sft_only: bool  # all rows go to SFT, no --data_split
    entry: CatalogueEntry | None  # None: a local file whose columns pick the formatter
    path: str | None  # local file or folder; None: load from the hub


def resolve_sources(data_path: list[str], sft_only_data_path: list[str]) -> list[Source]:
    """Every --data_path / --sft_only_data_path entry as a Source; all problems reported at once."""
    sources, problems = [], []
    for specs, sft_only in ((data_path, False), (sft_only_data_path, True)):
        for spec in specs:
            try:
                sources.append(resolve_source(spec, sft_only))
            except DataError as err:
                problems.append(str(err))
    if not sources and not problems:
        problems.append("no data: pass --data_path (or --sft_only_data_path)")
    problems += duplicate_problems(sources)
    if sources and sum(s.weight for s in sources) <= 0:
        problems.append("data weights sum to 0: give at least one data set a weight above 0")
    if problems:
        raise DataError("\n".join(problems))
    return sources


def duplicate_problems(sources: list[Source]) -> list[str]:
    """Sources that read the same rows: the same name, or the same file however it is
    spelled (relative, absolute, through a symlink or a hard link, or a folder and a file
    inside it). Refused rather than silently deduplicated: DeepSpeed-Chat trains such rows
    twice, and which copy to drop (with which weight) is the user's call; NAME:2 says it."""
    owner: dict[object, Source] = {}
    problems = []
    for source in sources:
        for key, what in _identities(source):
            first = owner.setdefault(key, source)
            if first is not source:
                both = (
                    f"data source {first.name!r} is given twice"
                    if first.name == source.name
                    else f"data sources {first.name!r} and {source.name!r} both read {what}"
                )
                problems.append(
                    f"{both}, so its rows would train twice; give it once (to train it twice "
                    f"as often, write {first.name}:2)"
                )
                break
    return problems


def _identities(source: Source) -> list[tuple[object, str]]:
    """(identity, description) of everything `source` reads: its files, or its hub name."""
    if source.path is None:
        return [(("hub", source.name), source.name)]
    if os.path.isdir(source.path) and not is_saved_dataset(source.path):
        files = [f for group in find_split_files(source.path).values() for f in group]
    else:
        files = [source.path]
    return [((os.stat(f).st_dev, os.stat(f).st_ino), f) for f in sorted(set(files))]


def resolve_source(spec: str, sft_only: bool = False) -> Source:
    name, weight = parse_weight(spec)
    if os.path.exists(name):
        return Source(name, weight, sft_only, catalogue_entry_for_path(name), name)
    if name == "local/jsonfile":
        return Source(name, weight, sft_only, DATASETS[name], find_jsonfile_dir())
    if name in DATASETS:
        return Source(name, weight, sft_only, DATASETS[name], None)
    if looks_like_path(name):
        raise DataError(f"data path {name!r} does not exist (from --data_path {spec!r})")
    known = "\n  ".join(DATASETS)
    raise DataError(
        f"unknown data set {name!r}: not a local file or folder, nor one of\n  {known}\n"
        "or pass a local .json/.jsonl/.csv/.parquet file, a folder of them, or a "
        "save_to_disk folder (a folder path ending in a name above uses that data set's format)"
    )


def parse_weight(spec: str) -> tuple[str, float]:
    """'path:0.5' -> ('path', 0.5). A path that exists as written never has a weight."""
    name, sep, text = spec.rpartition(":")
    if os.path.exists(spec) or not sep or "/" in text or os.sep in text:
        return spec, 1.0
    try:
        weight = float(text)
    except ValueError:
        raise DataError(
            f"data set {spec!r}: weight {text!r} is not a number; write NAME:WEIGHT, e.g. {name}:0.5"
        ) from None
    if not math.isfinite(weight) or weight < 0:
        raise DataError(f"data set {spec!r}: weight must be a finite number >= 0, e.g. {name}:0.5")
    return name, weight


def looks_like_path(name: str) -> bool:
    """Hub names are owner/name; anything with a file suffix or a path prefix is a path."""
    return name.startswith((".", "/", "~")) or os.path.splitext(name)[1].lower() in BUILDERS


def catalogue_entry_for_path(path: str) -> CatalogueEntry | None:
    """A local copy of a hub data set (a path ending in its name) uses that data set's catalogue entry."""
    normal = os.path.normpath(os.path.abspath(path)).replace(os.sep, "/")
    for name, entry in DATASETS.items():
        if normal.endswith("/" + name) and name != "local/jsonfile":
            return entry
    return None


def find_jsonfile_dir() -> str:
    folder = os.path.abspath(JSONFILE_DIR)
    if not os.path.isfile(os.path.join(folder, "train.json")):
        raise DataError(
            f"local/jsonfile: {folder}/train.json not found; it reads data/train.json and "
            "data/eval.json (rows with prompt, chosen, rejected) from the current directory"
        )
    return folder


def load_source(source: Source, cache_dir: str) -> tuple[dict[str, Dataset], Formatter]:
    """{"train": rows[, "eval": rows]} and the formatter for them."""
    entry = source.entry
    if entry is None:
        eval_splits = EVAL_SPLITS
    else:  # a hub copy: its own eval split first; none for train-only data sets, like the hub
        eval_splits = (entry.eval_split, *EVAL_SPLITS) if entry.eval_split else ()
    if source.path:
        splits = load_local(source.path, cache_dir, eval_splits)
    else:
        splits = load_hub(source.name, entry)
    if entry is None:
        return splits, detect_format(splits["train"].column_names, source.name)
    for split, rows in splits.items():
        missing = [c for c in entry.columns if c not in rows.column_names]
        if missing:
            raise DataError(
                f"{source.name} ({split}): missing column(s) {missing}; found {rows.column_names}. "
                f"This data set needs {list(entry.columns)}"
            )
    return splits, entry.format


def load_hub(name: str, entry: CatalogueEntry) -> dict[str, Dataset]:
    """The hub data set behind catalogue entry `name` (mkqa-Chinese loads mkqa, say)."""
    try:
        loaded = load_dataset(entry.hub_name, entry.config)
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as err:
        raise DataError(
            f"cannot load {entry.hub_name!r} from the Hugging Face hub ({err}). Offline? On a "
            f"machine with access run datasets.load_dataset({entry.hub_name!r}"
            f"{f', {entry.config!r}' if entry.config else ''}).save_to_disk('DIR/{name}') "
            f"(or download the repository to DIR/{name}), copy DIR here and pass "
            f"--data_path DIR/{name}"
        ) from err
    splits = {"train": loaded["train"]}
    if entry.eval_split:
        splits["eval"] = loaded[entry.eval_split]
    return splits


def fingerprint_source(source: Source) -> str:
    """Changes whenever the source's rows change: file contents, or the hub data's fingerprint."""
    if source.path:
        return fingerprint_path(source.path)
    return ",".join(rows._fingerprint for rows in load_hub(source.name, source.entry).values())
