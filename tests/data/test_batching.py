"""Batches: padding only to the longest row, labels, and the length-grouped distributed sampler."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from utils.data.collate import collate
from utils.data.common import IGNORE_INDEX
from utils.data.config import BatchConfig
from utils.data.loaders import build_eval_loader, build_train_loader
from utils.data.sampler import FILLER, LengthGroupedSampler
from utils.demo.tiny import build_opt_model
from utils.model.loss import token_nll

PAD = 1


def train_loader(dataset, batch_cfg, micro_batch, max_seq_len, rank=0, world_size=1):
    return build_train_loader(
        dataset,
        batch_cfg,
        micro_batch=micro_batch,
        max_seq_len=max_seq_len,
        pad_token_id=PAD,
        seed=0,
        rank=rank,
        world_size=world_size,
        mask_dtype=torch.float32,
        on_gpu=False,
    )


def rows_of(lengths: list[int], prompt_len: int = 3) -> list[dict]:
    return [
        {
            "input_ids": [(7 * i + j) % 90 + 4 for j in range(n)],
            "loss_spans": [[min(prompt_len, n), n]],
        }
        for i, n in enumerate(lengths)
    ]


def test_pads_only_to_the_longest_row_rounded_to_8():
    batch = collate(rows_of([3, 11, 5]), pad_token_id=PAD, loss_on="all")
    assert batch["input_ids"].shape == (3, 16)
    assert batch["attention_mask"].sum(1).tolist() == [3, 11, 5]
    assert batch["seq_lens"].tolist() == [3, 11, 5]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_pad_to_max_len_keeps_deepspeed_chat_width():
    assert collate(rows_of([3, 11]), pad_token_id=PAD, loss_on="all", pad_to=64)[
        "input_ids"
    ].shape == (2, 64)


def test_loss_on_response_masks_exactly_the_prompt():
    row = {"input_ids": [10, 11, 12, 13, 14], "loss_spans": [[2, 5]]}
    everything = collate([row], pad_token_id=PAD, loss_on="all")["labels"][0].tolist()
    response = collate([row], pad_token_id=PAD, loss_on="response")["labels"][0].tolist()
    ignore = [IGNORE_INDEX] * 3  # padding to 8
    assert everything == [10, 11, 12, 13, 14, *ignore]
    assert response == [IGNORE_INDEX, IGNORE_INDEX, 12, 13, 14, *ignore]


def test_padded_batch_has_the_loss_of_its_rows_alone(tiny_tokenizer):
    model = build_opt_model(tiny_tokenizer).eval()
    rows = rows_of([4, 13, 7])
    with torch.no_grad():
        batch = collate(rows, pad_token_id=tiny_tokenizer.pad_token_id, loss_on="all", pad_to=32)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        padded_nll, padded_count = token_nll(logits, batch["labels"], fp32=True)
        alone_nll, alone_count = 0.0, 0
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            nll, count = token_nll(model(input_ids=ids).logits, ids, fp32=True)
            alone_nll, alone_count = alone_nll + nll, alone_count + count
    assert padded_count == alone_count == 3 + 12 + 6
    assert torch.allclose(padded_nll, alone_nll, rtol=1e-5)


def sampled_rows(sampler: LengthGroupedSampler) -> list[int]:
    return [i for batch in sampler for i in batch if i != FILLER]


@pytest.mark.parametrize("n_rows", [64, 67, 70])
@pytest.mark.parametrize("world_size", [1, 2])
def test_sampler_yields_every_row_once_per_epoch_with_equal_steps(n_rows, world_size):
    lengths = torch.randint(1, 300, (n_rows,), generator=torch.Generator().manual_seed(0))
    ranks = [
        LengthGroupedSampler(lengths.tolist(), 4, rank, world_size, seed=3)
        for rank in range(world_size)
    ]
    orders = []
    for epoch in (0, 1):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        per_rank = [sampled_rows(s) for s in ranks]
        assert sorted(i for rows in per_rank for i in rows) == list(range(n_rows))
        assert len({len(list(s)) for s in ranks}) == 1  # every rank the same number of steps
        assert all(len(list(s)) == len(s) for s in ranks)
        orders.append(per_rank[0])
    assert orders[0] != orders[1]  # a new order every epoch


def test_rank_without_rows_gets_a_zero_weight_filler():
    # 9 rows, 2 ranks of batch 4: the last global batch has one row, rank 1 gets a filler.
    ranks = [LengthGroupedSampler([5] * 9, 4, rank, 2, seed=0) for rank in (0, 1)]
    assert [FILLER] in list(ranks[1]) or [FILLER] in list(ranks[0])
    dataset = Dataset.from_list(rows_of([5] * 9))
    loader = train_loader(dataset, BatchConfig(loss_on="all"), 4, 64, rank=1, world_size=2)
    batches = list(loader)
    filler = [b for b in batches if len(b["seq_lens"]) == 0]
    assert len(filler) == 1 and (filler[0]["labels"] == IGNORE_INDEX).all()


def test_length_grouping_removes_most_padding_and_stays_random():
    lengths = torch.randint(8, 512, (2048,), generator=torch.Generator().manual_seed(1)).tolist()

    def padding(sampler):
        padded = sum(max(lengths[i] for i in b) * len(b) for b in sampler)
        return 1 - sum(lengths) / padded

    grouped = LengthGroupedSampler(lengths, 8, seed=0)
    random = LengthGroupedSampler(lengths, 8, seed=0, group_by_length=False)
    assert padding(grouped) < 0.05 < 0.3 < padding(random)
    # Batch order is shuffled: the first batches are not simply the longest rows.
    firsts = [max(lengths[i] for i in b) for b in list(grouped)[:8]]
    assert firsts != sorted(firsts, reverse=True)


def test_train_loader_default_and_pad_to_max():
    dataset = Dataset.from_list(rows_of([3, 30, 6, 9, 40, 2, 17]))
    grouped = list(train_loader(dataset, BatchConfig(loss_on="all"), 2, 64))
    fixed = list(train_loader(dataset, BatchConfig(pad_to_max_len=True, loss_on="all"), 2, 64))
    assert sorted(n for b in grouped for n in b["seq_lens"].tolist()) == [2, 3, 6, 9, 17, 30, 40]
    assert all(b["input_ids"].shape[1] == 64 for b in fixed)
    assert sum(b["input_ids"].numel() for b in grouped) < sum(b["input_ids"].numel() for b in fixed)


def test_eval_loader_covers_each_row_once_across_ranks():
    dataset = Dataset.from_list(rows_of([3, 30, 6, 9, 40]))
    seen = [
        n
        for rank in (0, 1)
        for b in build_eval_loader(
            dataset,
            BatchConfig(loss_on="all"),
            micro_batch=2,
            pad_token_id=PAD,
            rank=rank,
            world_size=2,
            on_gpu=False,
        )
        for n in b["seq_lens"].tolist()
    ]
    assert sorted(seen) == [3, 6, 9, 30, 40]
