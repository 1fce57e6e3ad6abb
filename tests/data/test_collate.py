"""On a GPU batches come in few widths (multiples of 64: every new width pays first-use
costs there); on a CPU, which pays for every padded position, in multiples of 8."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from utils.data.config import BatchConfig
from utils.data.loaders import build_eval_loader, build_train_loader

LENGTHS = [3, 9, 17, 30, 41, 58, 66, 70, 90, 100, 120, 127]


def widths(loader) -> set[int]:
    """The widths of an epoch's batches, collated as the loader collates them (no workers
    are started: on a GPU the loader's would be)."""
    return {loader.collate_fn(loader.dataset[i])["input_ids"].shape[1] for i in loader.sampler}


@pytest.mark.parametrize(("on_gpu", "multiple"), [(True, 64), (False, 8)])
@pytest.mark.parametrize("packing", [False, True])
def test_batch_widths_are_multiples_chosen_for_the_device(on_gpu, multiple, packing):
    rows = Dataset.from_list([{"input_ids": [5] * n, "loss_spans": [[1, n]]} for n in LENGTHS])
    geometry = {"pad_token_id": 1, "rank": 0, "world_size": 1, "on_gpu": on_gpu}
    batch = BatchConfig(loss_on="all", packing=packing)
    train = build_train_loader(
        rows, batch, micro_batch=2, max_seq_len=128, seed=0, mask_dtype=torch.float32, **geometry
    )
    found = widths(train) | widths(build_eval_loader(rows, batch, micro_batch=2, **geometry))
    assert all(w % multiple == 0 for w in found)
    assert on_gpu or any(w % 64 for w in found)  # a CPU's batches stay tighter
