"""The data cache under faults (issue 21): a full disk at any write of a build, and a build
killed after publishing its entry.

Before: a full disk at the first write said the input file "cannot be read", and later in
the build the OSError escaped as a traceback; a build killed between publishing its entry
and deleting its work folder left that folder (three times the input) for good, because
the next run took the cache hit and returned before sweeping.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from datasets.arrow_writer import ArrowWriter

from tests.conftest import REPO
from utils.data.build import build_sft_data
from utils.data.cache import WORK_PREFIX, CacheDiskFull, entry_lock
from utils.data.config import DataConfig


def write_source(folder, rows: int) -> str:
    folder.mkdir(parents=True)
    for name in ("train", "eval"):
        with open(folder / f"{name}.jsonl", "w") as f:
            for i in range(rows):
                f.write(json.dumps({"prompt": f" Human: Q{i}? Assistant:", "chosen": f" A{i}."}))
                f.write("\n")
    return str(folder)


def config(src: str, cache) -> DataConfig:
    return DataConfig(data_path=[src], data_split="10,0,0", data_output_path=str(cache))


def leftovers(cache) -> list[str]:
    return sorted(n for n in os.listdir(cache) if not n.endswith(".lock"))


class FullDisk:
    """ArrowWriter, the one writer of every Arrow file a build makes (load_dataset's copy
    of the input, each map, save_to_disk), failing from its `fail_at`-th write on."""

    def __init__(self, monkeypatch, fail_at: int | None):
        self.writes, self.fail_at = 0, fail_at
        real = ArrowWriter._write_table

        def write(writer, *args, **kwargs):
            self.writes += 1
            if self.fail_at is not None and self.writes >= self.fail_at:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(writer, *args, **kwargs)

        monkeypatch.setattr(ArrowWriter, "_write_table", write)


def test_a_full_disk_at_any_write_of_a_build_names_the_cache_folder_and_leaves_nothing(
    tmp_path, tiny_tokenizer, monkeypatch
):
    src = write_source(tmp_path / "src", rows=20)
    disk = FullDisk(monkeypatch, fail_at=None)
    build_sft_data(config(src, tmp_path / "counted"), tiny_tokenizer, None)
    writes = disk.writes
    assert writes >= 6  # two inputs read, formatted, tokenised, and the entry saved

    cache = tmp_path / "cache"
    for fail_at in range(1, writes + 1):
        disk.writes, disk.fail_at = 0, fail_at
        with pytest.raises(CacheDiskFull) as refused:
            build_sft_data(config(src, cache), tiny_tokenizer, None)
        message = str(refused.value)
        assert message.startswith(
            f"no room for the tokenised-data cache in --data_output_path {cache}: the build needs "
        ), (fail_at, message)
        # About 3x the input, or (with this tiny tokenizer's many ids) more than it wrote.
        assert " input files) and the file system has " in message or (
            " it had written when the disk filled and the file system has " in message
        )
        assert message.endswith(
            "free. Free space there, or point --data_output_path at a disk with room "
            "(nothing was cached)."
        )
        assert leftovers(cache) == [], fail_at  # no entry, no work folder

    disk.fail_at = None  # space freed: the same command builds
    assert len(build_sft_data(config(src, cache), tiny_tokenizer, None).train) == 20


TMPFS_BUILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from transformers import AutoTokenizer
    from utils.data.build import build_sft_data
    from utils.data.config import DataConfig
    from utils.errors import UserError
    cfg = DataConfig(data_path=[sys.argv[3]], data_split="10,0,0", data_output_path=sys.argv[4])
    try:
        build_sft_data(cfg, AutoTokenizer.from_pretrained(sys.argv[2]), None)
    except UserError as err:
        print(f"error: {err}")
    """
)


def can_mount_tmpfs(folder) -> bool:
    if not shutil.which("unshare"):
        return False
    probe = f"mount -t tmpfs -o size=64k tmpfs {folder}"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True, timeout=30)
    return done.returncode == 0


def test_a_real_full_disk_under_the_cache_is_named(tmp_path, tiny_tokenizer):
    """The same on a 512 KB tmpfs (in a user and mount namespace, where the system allows
    one), so the errors the libraries really raise on a full disk are recognised."""
    cache = tmp_path / "small-disk"
    cache.mkdir()
    if not can_mount_tmpfs(cache):
        pytest.skip("cannot mount a tmpfs here (unshare -rm refused)")
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    src = write_source(tmp_path / "src", rows=3000)  # ~0.3 MB of input, ~3 MB while building
    script = [sys.executable, "-c", TMPFS_BUILD, REPO, str(tmp_path / "tok"), src, str(cache)]
    mount = f'mount -t tmpfs -o size=512k tmpfs {cache} && exec "$@"'
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", mount, "sh", *script],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(
        f"error: no room for the tokenised-data cache in --data_output_path {cache}"
    ), done.stdout[-3000:] + done.stderr[-3000:]


def test_a_build_killed_after_publishing_its_entry_leaves_no_work_folder_after_the_next_run(
    tmp_path, tiny_tokenizer, monkeypatch
):
    src = write_source(tmp_path / "src", rows=20)
    cache = tmp_path / "cache"
    real_rmtree = shutil.rmtree

    def killed_before_the_delete(path, *args, **kwargs):
        if os.path.basename(path).startswith(WORK_PREFIX):
            raise KeyboardInterrupt  # the kill, between the entry's rename and this delete
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_before_the_delete)
    with pytest.raises(KeyboardInterrupt):
        build_sft_data(config(src, cache), tiny_tokenizer, None)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    work, entry = leftovers(cache)
    assert entry.startswith("sft-") and work.startswith(f"{WORK_PREFIX}{entry}-")

    # Another entry's build that is alive right now (its builder holds the entry's lock).
    alive = cache / f"{WORK_PREFIX}sft-0123456789abcdef01234567-1"
    alive.mkdir()
    with entry_lock(str(cache / "sft-0123456789abcdef01234567")):
        data = build_sft_data(config(src, cache), tiny_tokenizer, None)  # a cache hit
        assert len(data.train) == 20
        assert leftovers(cache) == [alive.name, entry]
    build_sft_data(config(src, cache), tiny_tokenizer, None)  # its builder is gone now
    assert leftovers(cache) == [entry]
