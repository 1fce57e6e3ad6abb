"""Local data on disk: single files, folders of split files, and save_to_disk folders."""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re

import pyarrow
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError

from utils.data.common import DataError
from utils.files import is_disk_full

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
EVAL_SPLITS = ("eval", "validation", "valid", "dev", "test")


def is_saved_dataset(path: str) -> bool:
    """A folder written by Dataset(Dict).save_to_disk."""
    names = ("dataset_dict.json", "state.json")
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in names)


def load_local(
    path: str, cache_dir: str, eval_splits: tuple[str, ...] = EVAL_SPLITS
) -> dict[str, Dataset]:
    """{"train": rows[, "eval": rows]} from a file or folder.

    eval_splits are the split names tried in order for the eval rows; () means train only.
    """
    if is_saved_dataset(path):
        saved = load_from_disk(path)
        splits = dict(saved) if isinstance(saved, DatasetDict) else {"train": saved}
    elif os.path.isfile(path):
        return {"train": load_files([path], cache_dir)}
    elif os.path.isdir(path):
        splits = find_split_files(path)
    else:
        raise DataError(f"data path {path!r} does not exist")
    if "train" not in splits:
        raise DataError(
            f"{path}: no train split; found {sorted(splits) or 'no data files'}. Name the "
            "training file train.jsonl/.json/.csv/.parquet (and the eval file eval.*, "
            "validation.* or test.*), or pass a single file"
        )
    picked = {"train": splits["train"]}
    eval_name = next((name for name in eval_splits if name in splits), None)
    if eval_name:
        picked["eval"] = splits[eval_name]
    # save_to_disk splits are already (memory-mapped) Datasets; folders give file lists.
    return {k: v if isinstance(v, Dataset) else load_files(v, cache_dir) for k, v in picked.items()}


def find_split_files(folder: str) -> dict[str, list[str]]:
    """Data files in `folder` (or its data/ subfolder, the hub layout) grouped by split name.

    A file's split is the first word of its name: train.jsonl, test-00000-of-00001.parquet.
    """
    found: dict[str, list[str]] = {}
    for base in (folder, os.path.join(folder, "data")):
        if not os.path.isdir(base):
            continue
        for name in sorted(os.listdir(base)):
            stem, ext = os.path.splitext(name)
            if ext.lower() in BUILDERS and os.path.isfile(os.path.join(base, name)):
                split = re.split(r"[^a-zA-Z]", stem, maxsplit=1)[0].lower()
                found.setdefault(split, []).append(os.path.join(base, name))
    return found


def part_files(path: str, part: str) -> list[str]:
    """The files a local source's "train" or "eval" rows come from (for messages); a
    source without an eval file takes its eval rows from the train files."""
    if os.path.isfile(path):
        return [path]
    if is_saved_dataset(path) or not os.path.isdir(path):
        return []
    found = find_split_files(path)
    name = next((n for n in EVAL_SPLITS if n in found), "train") if part == "eval" else "train"
    return found.get(name, [])


def load_files(files: list[str], cache_dir: str) -> Dataset:
    builders = {BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files}
    if len(builders) != 1 or None in builders:
        raise DataError(
            f"cannot read {files}: use one of the formats {sorted(BUILDERS)} for every file of a split"
        )
    builder = builders.pop()
    empty = [f for f in files if _is_blank(f)]
    if empty:
        raise DataError(
            f"{empty[0]} is empty: every data file needs rows. Fill it or remove it "
            "(a folder without an eval file takes its eval rows from a 9:1 split of train)."
        )
    if builder in ("json", "csv") and (problem := _find_bad_utf8(files)):
        raise DataError(problem)
    try:
        return load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
    except (DatasetGenerationError, pyarrow.ArrowException, ValueError) as err:
        if is_disk_full(err):  # writing the Arrow copy failed, not reading: the cache's problem
            raise
        cause = err.__cause__ or err
        problem = _find_bad_json(files) if builder == "json" else None
        raise DataError(problem or f"cannot read {files}: {cause}") from err


def _is_blank(path: str) -> bool:
    with open(path, "rb") as f:
        return not f.read(4096).strip() and os.path.getsize(path) <= 4096


def _find_bad_utf8(files: list[str]) -> str | None:
    """File and line of the first bytes that are not UTF-8. Checked before reading: the
    JSON reader lets such bytes into the rows, where they fail later without a name."""
    for path in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0  # of the chunk being decoded, in the file
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as err:
                    # err.object is this chunk after any bytes held back from the last one.
                    return _bad_byte(path, offset - (len(err.object) - len(chunk)) + err.start)
                offset += len(chunk)
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                return (
                    f"{path}: ends inside a UTF-8 character (the file is cut short); copy it again"
                )
    return None


def _bad_byte(path: str, position: int) -> str:
    """The message for the byte at `position`; lines are counted only now, on failure."""
    with open(path, "rb") as f:
        before = f.read(position)
        byte = f.read(1)
    line, column = before.count(b"\n") + 1, position - before.rfind(b"\n")
    return (
        f"{path}:{line}: not UTF-8 text (byte {byte[0]:#04x} at column {column}); save the "
        "file as UTF-8, e.g. with `iconv -f latin1 -t utf-8` if it is Latin-1"
    )


def _find_bad_json(files: list[str]) -> str | None:
    """File and line of the first malformed JSON record (pyarrow's error names neither)."""
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if text.lstrip().startswith("["):
            try:
                json.loads(text)
            except json.JSONDecodeError as err:
                return f"{path}:{err.lineno}: malformed JSON ({err.msg})"
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                if line.strip() and not isinstance(json.loads(line), dict):
                    return f"{path}:{number}: expected a JSON object per line"
            except json.JSONDecodeError as err:
                return f"{path}:{number}: malformed JSON line ({err.msg})"
    return None


def fingerprint_path(path: str) -> str:
    """Content hash of a file or of every file under a folder (names included)."""
    digest = hashlib.sha256()
    files = (
        [path]
        if os.path.isfile(path)
        else sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    )
    for file in files:
        digest.update(os.path.relpath(file, path).encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
