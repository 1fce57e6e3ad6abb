"""The tokenised-data cache: Arrow folders keyed by everything that changes their contents.

A cache entry appears in one os.replace of a finished, flushed folder, so readers never
see a half-written one; builders serialise on a file lock, so two runs sharing the folder
build once and never corrupt it. Nothing is pickled: Arrow data plus a JSON summary.

A build works in `.build-sft-<key>-<pid>` beside the entries (partial Arrow files and raw
downloads, easily 100+ MB). A killed build leaves it behind; the next build of any entry
deletes every such folder whose entry's lock nobody holds (their builders are dead).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any

import psutil
from datasets import load_from_disk
from filelock import FileLock, Timeout

from utils.data.common import SFTData, SourceStats
from utils.files import fsync_dir, fsync_tree

SUMMARY = "sources.json"  # written last: its presence marks a complete entry
WORK_PREFIX = ".build-"
ENTRY_PREFIX = "sft-"  # an entry's folder is ENTRY_PREFIX + its cache key
PROCESS_START = psutil.Process().create_time()


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def predates_process(folder: str) -> bool:
    """True for an entry made before this process started.

    --rebuild_data_cache replaces only such entries, so when rank 0 has just rebuilt
    the data the other ranks (and concurrent runs waiting on the lock) read it.
    """
    summary = os.path.join(folder, SUMMARY)
    return os.path.isfile(summary) and os.path.getmtime(summary) < PROCESS_START


def load_cached(folder: str) -> SFTData | None:
    if not os.path.isfile(os.path.join(folder, SUMMARY)):
        return None
    with open(os.path.join(folder, SUMMARY), encoding="utf-8") as f:
        sources = [SourceStats(**s) for s in json.load(f)]
    return SFTData(
        train=load_from_disk(os.path.join(folder, "train")),
        eval=load_from_disk(os.path.join(folder, "eval")),
        sources=sources,
        cache_key=os.path.basename(folder).removeprefix(ENTRY_PREFIX),
    )


def save_cached(data: SFTData, folder: str, work_dir: str) -> None:
    """Write into work_dir (same file system), then swap it in with one rename."""
    staged = os.path.join(work_dir, "entry")
    data.train.save_to_disk(os.path.join(staged, "train"))
    data.eval.save_to_disk(os.path.join(staged, "eval"))
    with open(os.path.join(staged, SUMMARY), "w", encoding="utf-8") as f:
        json.dump([dataclasses.asdict(s) for s in data.sources], f, indent=1)
    fsync_tree(staged)  # the rename must never publish names whose data a power cut lost
    if os.path.exists(folder):  # a forced rebuild: move the old entry out of the way first
        os.replace(folder, os.path.join(work_dir, "replaced"))
    os.replace(staged, folder)
    fsync_dir(os.path.dirname(os.path.abspath(folder)))


def entry_lock(folder: str) -> FileLock:
    """The lock a builder of the entry `folder` holds for the whole build."""
    return FileLock(folder + ".lock")


def work_folder(folder: str) -> str:
    """Where this process builds the entry `folder`: beside it, named after it."""
    root, name = os.path.split(folder)
    return os.path.join(root, f"{WORK_PREFIX}{name}-{os.getpid()}")


def sweep_dead_builds(folder: str) -> None:
    """Delete the work folders of killed builds. Call it holding `folder`'s lock: its own
    leftovers are then dead; another entry's are dead when nobody holds that entry's lock."""
    root, own = os.path.split(folder)
    for name in os.listdir(root):
        if not name.startswith(WORK_PREFIX + ENTRY_PREFIX):
            continue
        entry = name.removeprefix(WORK_PREFIX).rsplit("-", 1)[0]
        path = os.path.join(root, name)
        if entry == own:
            shutil.rmtree(path, ignore_errors=True)
            continue
        try:
            with entry_lock(os.path.join(root, entry)).acquire(timeout=0):
                shutil.rmtree(path, ignore_errors=True)
        except Timeout:
            pass  # being built right now
