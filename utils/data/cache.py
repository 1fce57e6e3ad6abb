"""The tokenised-data cache: Arrow folders keyed by everything that changes their contents.

A cache entry appears in one os.replace of a finished, flushed folder, so readers never
see a half-written one; builders serialise on a file lock, so two runs sharing the folder
build once and never corrupt it. Nothing is pickled: Arrow data plus a JSON summary.

A build works in `.build-sft-<key>-<pid>` beside the entries (partial Arrow files and raw
downloads, about three times the input). A killed build leaves it behind (even one killed
after its entry was renamed into place); the next run deletes every such folder whose
entry's lock nobody holds (their builders are dead), on a cache hit as on a build.

A full disk (or quota) at any write of a build ends in one CacheDiskFull naming the cache
folder, the room the build needs and the room free, with nothing left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import psutil
from datasets import load_from_disk
from filelock import FileLock, Timeout

from utils.data.common import DataError, SFTData, SourceStats
from utils.files import free_bytes, fsync_dir, fsync_tree, human_bytes, is_disk_full, tree_bytes

SUMMARY = "sources.json"  # written last: its presence marks a complete entry
WORK_PREFIX = ".build-"
ENTRY_PREFIX = "sft-"  # an entry's folder is ENTRY_PREFIX + its cache key
PROCESS_START = psutil.Process().create_time()
# A build's work folder at its largest (raw Arrow copy, formatted and tokenised rows, the
# staged entry) over its input files' size: measured 3.1 for rm-static rows and GPT-2's BPE.
BUILD_GROWTH = 3.1


class CacheDiskFull(DataError):
    """No room in --data_output_path for a cache build."""


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


@contextlib.contextmanager
def build_space(folder: str, input_bytes: int) -> Iterator[str]:
    """The work folder to build the entry `folder` in (call it holding the entry's lock),
    deleted when the build ends, however it ends. A full disk or quota at any write of the
    build (reading the input, formatting, tokenising, saving, renaming) is CacheDiskFull."""
    work = work_folder(folder)
    # Measured now: the build's deleted files stay allocated while its datasets map them.
    free = free_bytes(folder)
    try:
        os.makedirs(work)
        yield work
    except Exception as err:
        if not is_disk_full(err):
            raise
        raise no_room(os.path.dirname(folder), input_bytes, tree_bytes(work), free) from err
    finally:
        shutil.rmtree(work, ignore_errors=True)


def no_room(root: str, input_bytes: int, written: int, free: int) -> CacheDiskFull:
    """The message for a build that had `free` bytes and filled them after `written`."""
    estimate = round(BUILD_GROWTH * input_bytes)
    if estimate > written:
        needed = (
            f"about {human_bytes(estimate)} while it builds ({BUILD_GROWTH:g}x its "
            f"{human_bytes(input_bytes)} of input files)"
        )
    else:
        needed = f"more than the {human_bytes(written)} it had written when the disk filled"
    return CacheDiskFull(
        f"no room for the tokenised-data cache in --data_output_path {root}: the build needs "
        f"{needed} and the file system has {human_bytes(free)} free. Free space "
        "there, or point --data_output_path at a disk with room (nothing was cached)."
    )


def sweep_dead_builds(root: str, held: str | None = None) -> None:
    """Delete the work folders of killed builds in the cache folder `root`: those whose
    entry's lock nobody holds. `held`: the entry whose lock this process holds (and has
    not started building yet), so every work folder of it is dead. Cheap: one listdir,
    and a lock attempt only for a work folder found."""
    for name in os.listdir(root):
        if not name.startswith(WORK_PREFIX + ENTRY_PREFIX):
            continue
        entry = os.path.join(root, name.removeprefix(WORK_PREFIX).rsplit("-", 1)[0])
        path = os.path.join(root, name)
        if entry == held:
            shutil.rmtree(path, ignore_errors=True)
            continue
        try:
            with entry_lock(entry).acquire(timeout=0):
                shutil.rmtree(path, ignore_errors=True)
        except Timeout:
            pass  # being built right now
