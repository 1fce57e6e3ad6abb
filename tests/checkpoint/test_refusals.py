"""Refusing a checkpoint before the model loads (issue 21): one of another model, trained
with other settings, and one that other users can write.

Before: a checkpoint of another model named only a setting that differed; the user who
fixed it met the model mismatch in a second run, after loading the model. A checkpoint
folder anyone could write was unpickled by DeepSpeed as it was, running planted code.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import main as cli
import utils.checkpoint.trust as trust
from utils.checkpoint.checkpointer import build_checkpointer
from utils.checkpoint.checks import RUN_STATE, param_shapes
from utils.checkpoint.position import DataPosition
from utils.checkpoint.settings import run_settings
from utils.cli.parse import parse_args
from utils.data.build import build_sft_data
from utils.demo.tiny import build_opt_model
from utils.distributed import DistInfo
from utils.errors import UserError
from utils.model.load import load_tokenizer

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
STATES = "mp_rank_00_model_states.pt"


def write_checkpoint(folder: Path, settings: dict, shapes: dict, model: str) -> Path:
    """A checkpoint folder as a run writes it, with one (empty) torch file."""
    folder.mkdir(parents=True)
    torch.save({}, folder / STATES)
    state = {
        "step": 1,
        "position": asdict(DataPosition()),
        "shape": {"world_size": 1, "zero_stage": 0, "param_shapes": shapes, "model": model},
        "settings": settings,
        "files": [STATES],
    }
    (folder / RUN_STATE).write_text(json.dumps(state))
    return folder


def command(model_dir, tmp_path: Path, *extra: str) -> list[str]:
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        row = {"prompt": " Human: Say yes. Assistant:", "chosen": " Yes."}
        for name in ("train", "eval"):
            (data / f"{name}.jsonl").write_text((json.dumps(row) + "\n") * 8)
    return [
        "--model_name_or_path", str(model_dir),
        "--data_path", str(data),
        "--data_split", "10,0,0",
        "--data_output_path", str(tmp_path / "cache"),
        "--max_seq_len", "32",
        "--output_dir", str(tmp_path / "out"),
        *extra,
    ]  # fmt: skip


def test_a_checkpoint_of_another_model_is_refused_with_every_difference_at_once(
    tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch, capsys
):
    # The checkpoint: another (narrower) model, trained with --max_steps 1 on the same data.
    cfg = parse_args(command(tiny_model_dir, tmp_path, "--max_steps", "1"))
    data = build_sft_data(cfg.data, load_tokenizer(cfg.model, None), None)
    settings = run_settings(cfg, data.cache_key, 1)
    other = param_shapes(build_opt_model(tiny_tokenizer, hidden_size=32))
    path = write_checkpoint(tmp_path / "out" / "checkpoint-1", settings, other, "/models/opt-a")

    real_build_model = cli.build_model

    def on_meta_only(*args, on_meta=False, **kwargs):
        assert on_meta, "the model loaded before the checkpoint was refused"
        return real_build_model(*args, on_meta=on_meta, **kwargs)

    monkeypatch.setattr(cli, "build_model", on_meta_only)
    resume = ["--max_steps", "2", "--resume_from_checkpoint", "auto"]
    assert cli.main(command(tiny_model_dir, tmp_path, *resume)) == 2
    err = capsys.readouterr().err
    start = err.index("error: ")
    lines = err[start:].splitlines()[:4]
    assert lines[0] == (
        f"error: checkpoint {path} was trained from another model and with other settings; "
        "continuing it with these would change the run (its model, data order, schedule or "
        "optimisation):"
    )
    ours = param_shapes(build_opt_model(tiny_tokenizer))
    rows = other["model.decoder.embed_tokens.weight"][0]
    assert lines[1] == (
        f"  - the model: model.decoder.embed_tokens.weight is [{rows}, 32] there and [{rows}, "
        f"64] here (the checkpoint's {sum(torch.Size(s).numel() for s in other.values()):,} "
        f"parameters, trained from /models/opt-a; --model_name_or_path {tiny_model_dir} makes "
        f"{sum(torch.Size(s).numel() for s in ours.values()):,}); pass --model_name_or_path "
        "/models/opt-a"
    )
    assert lines[2] == "  - --max_steps 1 in the checkpoint, 2 now: pass --max_steps 1"
    assert lines[3].startswith("Resume with the --model_name_or_path, tokenizer and LoRA flags")


# A checkpoint others can write ---------------------------------------------------------


@pytest.fixture
def users(monkeypatch):
    """Who the checks see: the user "me", and the group of the test's files, returned for
    the test to rename or fill (first: "me" alone, a private group); other ids have no name."""
    me = SimpleNamespace(pw_name="me", pw_gid=os.getegid())
    group = SimpleNamespace(gr_name="me", gr_mem=[])

    def getpwuid(uid):
        if uid == os.geteuid():
            return me
        raise KeyError(uid)

    def getgrgid(gid):
        if gid == os.getegid():
            return group
        raise KeyError(gid)

    monkeypatch.setattr(trust.pwd, "getpwuid", getpwuid)
    monkeypatch.setattr(trust.grp, "getgrgid", getgrgid)
    return group


def resume_from(path: Path, *flags: str):
    """build_checkpointer as main.py calls it, resuming `path` with the settings it records."""
    cfg = parse_args(["--model_name_or_path", "m", "--resume_from_checkpoint", str(path), *flags])
    settings = json.loads((path / RUN_STATE).read_text())["settings"]
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return build_checkpointer(cfg.checkpoint, str(path.parent), settings, CPU)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def give_away(ckpt: Path, monkeypatch, group) -> None:
    if os.geteuid() == 0:
        os.chown(ckpt / STATES, 4242, -1)
    else:  # only root can give a file away: be someone else instead
        monkeypatch.setattr(trust.os, "geteuid", lambda: os.getuid() + 1)


def share_with_team(ckpt: Path, monkeypatch, group) -> None:
    os.chmod(ckpt, 0o775)
    group.gr_name, group.gr_mem = "team", ["me", "someone"]


CHANGES = {  # id: (how the checkpoint is changed, what the refusal names; None: accepted)
    "file-by-all": (lambda c, m, g: os.chmod(c / STATES, 0o646), "{c}/{s} is writable by every"),
    "output-by-all": (lambda c, m, g: os.chmod(c.parent, 0o777), "{o} is writable by every user"),
    "sticky-output": (lambda c, m, g: os.chmod(c.parent, 0o1777), None),  # as /tmp
    "other-owner": (give_away, "{c}/{s} is owned by user"),
    "private-group": (lambda c, m, g: os.chmod(c, 0o775), None),  # umask 002, own group
    "team-group": (share_with_team, "{c} is writable by group team (mode 0775)"),
    "links": (lambda c, m, g: (os.symlink(STATES, c / "a.pt"), os.symlink("gone", c / "b")), None),
}


@pytest.mark.parametrize(("change", "refused"), CHANGES.values(), ids=CHANGES.keys())
def test_a_checkpoint_others_can_change_is_refused_before_it_is_read(
    tmp_path, users, monkeypatch, change, refused
):
    ckpt = write_checkpoint(tmp_path / "out" / "checkpoint-1", {}, {}, "m")
    cfg = parse_args(["--model_name_or_path", "m", "--max_steps", "3"])
    settings = run_settings(cfg, "key", world_size=1)
    (ckpt / RUN_STATE).write_text(
        json.dumps({**json.loads((ckpt / RUN_STATE).read_text()), "settings": settings})
    )
    change(ckpt, monkeypatch, users)
    try:
        if refused is None:
            assert resume_from(ckpt, "--max_steps", "3").resume_from == str(ckpt)
            return
        with pytest.raises(UserError) as caught:
            resume_from(ckpt, "--max_steps", "3")
        message = str(caught.value)
        assert message.startswith(f"checkpoint {ckpt} could run another user's code")
        assert refused.format(c=ckpt, s=STATES, o=ckpt.parent) in message
        assert f"chmod -R go-w {ckpt}" in message and "--trust_checkpoint" in message
        # The user who trusts them says so, and the resume goes on.
        trusted = resume_from(ckpt, "--max_steps", "3", "--trust_checkpoint")
        assert trusted.resume_from == str(ckpt)
    finally:
        os.chmod(ckpt.parent, 0o755)  # let pytest clean up
