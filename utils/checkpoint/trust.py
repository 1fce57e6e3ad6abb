"""Refusing a checkpoint that other users can write, before anything in it is unpickled.

DeepSpeed's load_checkpoint reads the checkpoint's files with torch.load(weights_only=False),
and unpickling runs code: whoever can write those files, or the folders holding them (to
swap one in), can make a resume run their code as you. So, as ssh refuses a key file that
others can write, a resume refuses a checkpoint when the checkpoint folder, anything inside
it, or the folder holding it (the output folder) is

- owned by another user (root excepted: it can do anything anyway), or
- writable by every user, or by a group other than your own private group (the group
  named after you and holding only you, which systems with umask 002 give each user);
  the folder holding it may be writable by all when its sticky bit is set (as /tmp is:
  nobody can then rename or delete what you own there).

Under umask 022 every folder this tool writes passes. Under umask 002 it passes where the
group is your private group; with a shared group it is refused unless you pass
--trust_checkpoint (everyone in that group could otherwise run code as you). Folders above
the output folder are not checked.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat

from utils.errors import UserError

SHOWN = 3  # problems named in the message; the rest are counted


def refuse_untrusted(path: str) -> None:
    """UserError naming what others can write in checkpoint `path`, and the fixes."""
    folder = os.path.realpath(path)
    problems = untrusted_entries(folder)
    if not problems:
        return
    more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
    raise UserError(
        f"checkpoint {path} could run another user's code: resuming unpickles its files, and "
        f"{'; '.join(problems[:SHOWN])}{more}. Make it yours alone (chmod -R go-w {folder} "
        f"and chmod go-w {os.path.dirname(folder)}; a copy with cp -r is owned by you), or "
        "pass --trust_checkpoint if you trust everyone who can write there."
    )


def untrusted_entries(folder: str) -> list[str]:
    """What others can change: the folder holding checkpoint `folder`, it, and its tree."""
    problems = [_untrusted(os.path.dirname(folder), holder=True), _untrusted(folder)]
    for root, dirs, files in os.walk(folder):
        problems += [_untrusted(os.path.join(root, name)) for name in sorted(dirs + files)]
    return [problem for problem in problems if problem]


def _untrusted(path: str, holder: bool = False) -> str | None:
    """Why others can change `path`, or None. `holder`: the folder holding the checkpoint."""
    try:
        info = os.stat(path)  # a symbolic link counts as what it points to (its mode is 0777)
    except OSError:
        return None  # a dangling link or a loop: nothing there can be loaded
    if info.st_uid not in (os.geteuid(), 0):
        return f"{path} is owned by {_user_name(info.st_uid)}"
    if holder and info.st_mode & stat.S_ISVTX:
        return None
    mode = stat.S_IMODE(info.st_mode)
    if mode & stat.S_IWOTH:
        return f"{path} is writable by every user (mode {mode:04o})"
    if mode & stat.S_IWGRP and not _is_private_group(info.st_gid):
        return f"{path} is writable by group {_group_name(info.st_gid)} (mode {mode:04o})"
    return None


def _is_private_group(gid: int) -> bool:
    """The user's own group: their primary group, named after them, with no other member."""
    try:
        user, group = pwd.getpwuid(os.geteuid()), grp.getgrgid(gid)
    except KeyError:  # ids without names (containers, NFS): not known to be private
        return False
    return (
        gid == user.pw_gid and group.gr_name == user.pw_name and set(group.gr_mem) <= {user.pw_name}
    )


def _user_name(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"user id {uid}"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"id {gid}"
