"""A full disk at the final save waits for room instead of losing the weights (issue 21).

Before: with the default --save_steps 0 a full disk at the final save ended the run, and
hours of training with it, although the process still held the weights. Now the save says
how much room it needs and has, waits (up to --disk_full_wait_minutes), and retries as
soon as the user has freed space; the bound or a Ctrl-C end it with today's message.
"""

from __future__ import annotations

import errno
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

import utils.model.save as save_module
from utils.model.publish import JOURNAL
from utils.model.save import DiskFullError, save_hf_model, write_model_folder

GB = 10**9
LOST = "No checkpoint holds the trained weights (--save_steps 0), so the run must be repeated."


def tiny(model_dir, shift: float):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(shift)
    return model


class Disk:
    """The output folder's file system as the save sees it: its free space, and writes that
    fail with ENOSPC while it is `full`. At the `user_acts`-th poll the user frees space
    (`action` "free") or presses Ctrl-C ("ctrl-c")."""

    def __init__(self, monkeypatch, free: int, full: bool, user_acts=None, action="free"):
        self.free, self.full, self.polls = free, full, 0
        self.user_acts, self.action = user_acts, action
        real_write = save_module.write_model_folder

        def write(*args, **kwargs):
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(*args, **kwargs)

        monkeypatch.setattr(save_module, "write_model_folder", write)
        monkeypatch.setattr(save_module, "free_bytes", lambda path: self.free)
        clock = SimpleNamespace(monotonic=time.monotonic, sleep=self.poll)
        monkeypatch.setattr(save_module, "time", clock)

    def poll(self, seconds: float) -> None:
        self.polls += 1
        if self.polls == self.user_acts and self.action == "ctrl-c":
            raise KeyboardInterrupt
        if self.polls == self.user_acts:
            self.free, self.full = self.free + 100 * GB, False


@pytest.mark.parametrize(
    ("free", "full"),
    [(10**6, True), (10 * GB, True)],
    ids=["before-writing", "the-write-fails"],  # e.g. a quota the free space does not show
)
def test_a_full_disk_at_the_final_save_waits_for_room_then_saves(
    tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch, capsys, free, full
):
    out = tmp_path / "out"
    trained = tiny(tiny_model_dir, 1.0)
    disk = Disk(monkeypatch, free=free, full=full, user_acts=3)
    save_hf_model(trained, tiny_tokenizer, str(out), 0, if_disk_full=LOST, wait_minutes=60)
    captured = capsys.readouterr()
    (warning,) = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert warning.startswith(f"warning: no room for the model in --output_dir {out}: it needs ")
    assert "Waiting up to 60 minutes (--disk_full_wait_minutes) for room" in warning
    assert warning.endswith(f"Ctrl-C stops waiting; then: {LOST}")
    assert f"{out} has room now" in captured.out and disk.polls == 3
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("end", ["bound", "ctrl-c"])
def test_a_wait_that_ends_without_room_says_what_is_lost_and_keeps_the_old_model(
    tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch, end
):
    out = tmp_path / "out"
    old = tiny(tiny_model_dir, 0.0)
    write_model_folder(old, tiny_tokenizer, old.state_dict(), None, str(out))
    if end == "ctrl-c":
        Disk(monkeypatch, free=10 * GB, full=True, user_acts=2, action="ctrl-c")
        wait_minutes = 60
    else:
        Disk(monkeypatch, free=10 * GB, full=True)  # nobody frees space
        wait_minutes = 1e-4  # six milliseconds
    with pytest.raises(DiskFullError) as caught:
        save_hf_model(
            tiny(tiny_model_dir, 1.0), tiny_tokenizer, str(out), 0, if_disk_full=LOST,
            wait_minutes=wait_minutes,
        )  # fmt: skip
    message = str(caught.value)
    no_room = f"no room for the model in --output_dir {out}: its weights need about "
    if end == "ctrl-c":
        assert message.startswith(f"stopped waiting for room (Ctrl-C): {no_room}")
    else:
        assert message.startswith(no_room) and message.endswith("(Waited 0 minutes for room.)")
    assert LOST in message
    assert not list(out.glob(".saving-*")) and not (out / JOURNAL).exists()
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in old.state_dict().items():  # the previous model is untouched
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0)
