"""Batches reach a GPU by asynchronous copies from pinned memory (the GPU path, forced here:
this CPU-only torch can neither pin nor copy to CUDA, so both are recorded instead)."""

from __future__ import annotations

import torch

from tests.token_loss_worker import PAD, build_model, build_rows
from utils.data.collate import collate
from utils.model.loss import choose_loss_path, prepare_batch


def test_every_tensor_copied_to_a_gpu_is_pinned_first(monkeypatch):
    path = choose_loss_path(
        build_model(), "on", zero_stage=0, device_type="cpu", fp32=False, compiled=False
    )
    batch = collate(build_rows(), pad_token_id=PAD, loss_on="all")
    pinned_by_loader = batch["input_ids"]
    pinned, copied = [pinned_by_loader], []
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t: any(t is p for p in pinned))
    monkeypatch.setattr(
        torch.Tensor, "pin_memory", lambda t: pinned.append(t.clone()) or pinned[-1]
    )

    def to(t, device, non_blocking=False):
        copied.append((t, non_blocking))
        return t

    monkeypatch.setattr(torch.Tensor, "to", to)
    prepared = prepare_batch(batch, path, torch.device("cuda"))
    assert "loss_positions" in prepared  # made here, on the host
    assert len(copied) == len(prepared) and all(asynchronous for _, asynchronous in copied)
    assert all(any(t is p for p in pinned) for t, _ in copied)
    assert len(pinned) == len(prepared)  # the loader's pinned tensor is not pinned again
