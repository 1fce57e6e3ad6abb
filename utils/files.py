"""Publishing files: atomic, durable, and readable by whoever the user's umask lets read.

Every file the tool hands to a user (the model folder, metrics.jsonl, training_curves.png,
prompt_eval's report, the LoRA adapter) is written under a temporary name and renamed into
place, so a reader never sees half of it. Temporary files are private by design (mkstemp
and safetensors' writer make them 0600, mkdtemp folders 0700); renamed as they are, a
teammate on a shared cluster could not read the model. `share` gives them the modes a
plain `open()`/`mkdir()` would have had under the user's umask, as save_pretrained's do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (no race with threads)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share(path: str) -> None:
    """Give `path` the mode a plain open()/mkdir() would have (0644/0755 under umask 022)."""
    mask = current_umask()
    mode = os.stat(path).st_mode
    executable = mode & 0o111 or os.path.isdir(path)
    os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def share_tree(folder: str) -> None:
    """`share` for a folder and everything under it."""
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            share(os.path.join(root, name))
    share(folder)


def fsync_tree(folder: str) -> None:
    """Flush every file under `folder` (and the folders' entries) to disk before it is
    published by a rename, so a power loss cannot publish names without their data."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def fsync_dir(folder: str) -> None:
    """Make the renames and deletions inside `folder` durable (a rename lives in its folder)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(source: str, target: str) -> None:
    """os.replace, then fsync the target's folder so the rename survives a power loss."""
    os.replace(source, target)
    fsync_dir(os.path.dirname(os.path.abspath(target)))


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path beside `path` to write to; on success it is flushed, shared and
    renamed to `path`; on failure it is removed and `path` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield temp
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        share(temp)
        replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
        raise


def write_atomically(path: str, text: str) -> None:
    """Replace `path` with `text` in one step (readers see the old or the new file, whole)."""
    with atomic_path(path) as temp, open(temp, "w", encoding="utf-8") as f:
        f.write(text)


def is_disk_full(err: BaseException) -> bool:
    """True for "no space left" and "quota exceeded", however a library wrapped them
    (safetensors raises its own error type with the OS error in its text)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return True
        if any(s in str(err) for s in ("No space left on device", "Disk quota exceeded")):
            return True
        err = err.__cause__ or err.__context__
    return False


def free_bytes(path: str) -> int:
    """Free bytes on the file system that holds `path` (or would: it may not exist yet)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return shutil.disk_usage(existing).free


def tree_bytes(path: str) -> int:
    """Bytes of the file `path`, or of the files under the folder `path` (0: neither)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):  # a file deleted while counting
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def human_bytes(n: float) -> str:
    """Decimal units with three significant digits, as `df -H` prints them: 6.08 MB."""
    if abs(n) < 1000:
        return f"{n:.0f} bytes"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if abs(n) < 999.5:  # would round to 1000: the next unit
            return f"{n:.3g} {unit}"
    return f"{n / 1000:.3g} TB" if abs(n) < 999_500 else f"{n / 1000:.0f} TB"
