"""Batches reach a GPU by asynchronous copies from pinned memory (the GPU path, forced here:
this CPU-only torch can neither pin nor copy to CUDA, so both are recorded instead)."""

from __future__ import annotations

import torch

from tests.token_loss_worker import PAD, build_model, build_rows
from utils.data.collate import collate
from utils.data.packing import collate_flat
from utils.model.loss import PLAIN_FP32, choose_loss_path, prepare_batch


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


def test_a_flat_pack_reaches_the_device_with_its_boundaries():
    """FlashAttention-2's packed batches carry plain ints (the longest example) beside their
    tensors; they go to the model as they are."""
    rows = [{"input_ids": list(range(4, 4 + n)), "loss_spans": [[1, n]]} for n in (5, 3, 7)]
    batch = collate_flat([rows[:2], rows[2:]], loss_on="all")
    prepared = prepare_batch(batch, PLAIN_FP32, torch.device("cpu"))
    assert prepared["max_length_q"] == prepared["max_length_k"] == 7
    assert prepared["cu_seq_lens_q"].tolist() == [0, 5, 8, 15]
    assert torch.equal(prepared["input_ids"], batch["input_ids"])
