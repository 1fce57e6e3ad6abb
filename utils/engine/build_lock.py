"""The lock a killed build of a DeepSpeed op leaves behind, named instead of waited on.

DeepSpeed builds its C++/CUDA ops (FusedAdam, CPU Adam, ...) on first use through
torch.utils.cpp_extension, which lets one process build while the others wait for a `lock`
file in the op's build folder (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions/
<python>_<cuda>/<op>) to disappear. A builder killed outright (SIGKILL, the OOM killer, a
scheduler's kill after its grace period) never removes it, and every later run waits for
it forever, silently. Call `check_build_lock` where an op is loaded.
"""

from __future__ import annotations

import os
import time

import psutil

from utils.distributed import warn_rank_0
from utils.errors import UserError

# A lock nobody on this machine holds may still be a build on another machine sharing the
# folder (a home directory on NFS): one that old is not. DeepSpeed's optimizer ops build in
# about a minute.
STALE_AFTER_S = 300
POLL_S = 2.0


def check_build_lock(op_name: str) -> None:
    """Before DeepSpeed loads `op_name`: fail, naming the lock file and the fix, when its
    build lock belongs to no living build. A lock a process on this machine holds is a build
    under way (torch waits for it); a younger one is waited on until it goes or grows stale."""
    if _prebuilt(op_name):
        return  # loaded from DeepSpeed's installation, never through the build folder
    lock = os.path.join(_build_folder(op_name), "lock")
    warned = False
    while (age := _age_s(lock)) is not None and not _held_on_this_machine(lock):
        if age > STALE_AFTER_S:
            raise UserError(
                f"{lock} is the lock of a build of DeepSpeed's {op_name} op that was killed: "
                f"no process on this machine holds it and it is {age / 60:.0f} minutes old, "
                "so loading the op would wait for it forever. If no build of the op is "
                f"running (on another machine sharing this folder either), remove it "
                f"(rm {lock}) and start the run again."
            )
        if not warned:
            warn_rank_0(
                f"waiting for {lock}: no process on this machine is building DeepSpeed's "
                f"{op_name} op; if none is elsewhere either, remove the file."
            )
            warned = True
        time.sleep(POLL_S)


def _build_folder(op_name: str) -> str:
    # torch's own rule for the folder (TORCH_EXTENSIONS_DIR or the per-user cache, tagged
    # with the Python and CUDA versions); it creates the folder, as loading the op would.
    from torch.utils.cpp_extension import _get_build_directory

    return _get_build_directory(op_name, verbose=False)


def _prebuilt(op_name: str) -> bool:
    from deepspeed.git_version_info import installed_ops

    return bool(installed_ops.get(op_name))


def _age_s(path: str) -> float | None:
    """Seconds since `path` was created; None when it does not exist (any more)."""
    try:
        return time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return None


def _held_on_this_machine(path: str) -> bool:
    """Whether any process here has `path` open (a builder keeps its lock open throughout)."""
    path = os.path.realpath(path)
    for process in psutil.process_iter():
        try:
            if any(f.path == path for f in process.open_files()):
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return False
