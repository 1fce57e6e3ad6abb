"""Who collates the training batches: the default from the device, and what the workers get.

Worker processes start by spawn (a fresh interpreter), so the loader's dataset, collate
function and worker set-up reach them pickled; every way of batching must survive that.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from datasets import Dataset

from utils.data.config import BatchConfig
from utils.data.loaders import build_train_loader, choose_loader_workers


@pytest.mark.parametrize(
    ("requested", "on_cuda", "masked_packs", "workers"),
    [
        (None, False, False, 0),  # a CPU: workers would compete with training for the cores
        (None, False, True, 0),
        (None, True, False, 0),  # padded batches: well under a millisecond to collate
        (None, True, True, 2),  # packs with [batch, 1, seq, seq] masks: costly to build
        (3, False, False, 3),  # --dataloader_num_workers wins everywhere
        (0, True, True, 0),
    ],
)
def test_the_default_workers_come_from_the_device_and_the_batches(
    requested, on_cuda, masked_packs, workers
):
    chosen = choose_loader_workers(requested, on_cuda=on_cuda, masked_packs=masked_packs)
    assert chosen.count == workers
    assert chosen.pin_memory == on_cuda  # page-locked only where a GPU copies from it


@pytest.mark.parametrize(
    ("batch", "layout"),
    [
        (BatchConfig(loss_on="all"), "mask"),
        (BatchConfig(loss_on="response", pad_to_max_len=True), "mask"),
        (BatchConfig(loss_on="all", packing=True), "mask"),
        (BatchConfig(loss_on="all", packing=True), "positions"),
        (BatchConfig(loss_on="all", packing=True), "flat"),
    ],
)
def test_every_way_of_batching_reaches_a_spawned_worker_intact(batch, layout):
    rows = [
        {"input_ids": list(range(4, 4 + n)), "loss_spans": [[2, n]]} for n in (5, 9, 3, 12, 7, 6)
    ]
    loader = build_train_loader(
        Dataset.from_list(rows),
        batch,
        micro_batch=2,
        max_seq_len=16,
        pad_token_id=1,
        seed=0,
        rank=0,
        world_size=1,
        mask_dtype=torch.float32,
        pack_layout=layout,
        workers=choose_loader_workers(2, on_cuda=False, masked_packs=False),
        on_gpu=False,
    )
    assert loader.num_workers == 2 and loader.multiprocessing_context.get_start_method() == "spawn"
    # What spawn sends each worker, through the same pickling.
    dataset, collate_fn, _ = pickle.loads(
        pickle.dumps((loader.dataset, loader.collate_fn, loader.worker_init_fn))
    )
    loader.sampler.set_epoch(0)
    for indices in loader.sampler:
        here = loader.collate_fn(loader.dataset[indices])
        there = collate_fn(dataset[indices])
        assert here.keys() == there.keys()
        for key, value in here.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(there[key])), key
