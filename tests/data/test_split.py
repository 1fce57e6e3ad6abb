"""Split and blend: deterministic, disjoint, exact sizes; sft-only sets; per-source weights."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from utils.data.build import build_sft_data
from utils.data.config import DataConfig
from utils.data.split import partition, partition_bounds, resample


@pytest.mark.parametrize("n", [0, 1, 7, 10, 101])
@pytest.mark.parametrize("weights", [[2, 4, 4], [1, 1, 1], [10, 0, 0], [0, 5, 5], [0.3, 0, 0.7]])
def test_partitions_are_disjoint_and_cover_every_row_exactly(n, weights):
    parts = [partition(n, weights, seed=7, index=i) for i in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    sizes = [len(p) for p in parts]
    assert sum(sizes) == n
    for size, w in zip(sizes, weights, strict=True):
        assert abs(size - n * w / sum(weights)) <= 1  # proportional, off by rounding at most
    # DeepSpeed-Chat's rule: a later phase with weight 0 gets nothing; the first phase
    # absorbs the rounding, so it can get a row even at weight 0 (n=1 with 0,5,5).
    assert all(size == 0 for size, w in zip(sizes[1:], weights[1:], strict=True) if w == 0)


def test_partition_sizes_for_odd_counts():
    assert partition_bounds(7, [2, 4, 4]) == [0, 1, 4, 7]  # 2.8 -> 3 twice; phase 1 gets the rest
    assert partition_bounds(11, [1, 1, 1]) == [0, 3, 7, 11]  # 3.67 -> 4 twice
    assert partition_bounds(5, [10, 0, 0]) == [0, 5, 5, 5]
    # DeepSpeed-Chat's first cut would be -1 here (3.5 -> 4 twice); no phase may overlap.
    assert partition_bounds(7, [0, 5, 5]) == [0, 0, 3, 7]


def deepspeed_chat_cuts(n: int, split: str) -> list[int]:
    """DeepSpeed-Chat's get_raw_dataset_split_index arithmetic, step by step as it reads:
    normalise, accumulate int(round(share * n)), then shift every cut by the overshoot."""
    shares = [float(s) for s in split.split(",")]
    shares = [s / sum(shares) for s in shares]
    cuts = [0]
    for share in shares:
        cuts.append(cuts[-1] + round(share * float(n)))
    overshoot = cuts[-1] - n
    return [cuts[0]] + [c - overshoot for c in cuts[1:]]


def deepspeed_chat_rows(n: int, split: str, seed: int, phase: int) -> list[int]:
    """The rows DeepSpeed-Chat gives a phase: a uint32 arange shuffled in place, then sliced."""
    order = np.arange(n, dtype=np.uint32)
    np.random.RandomState(seed=seed).shuffle(order)
    cuts = deepspeed_chat_cuts(n, split)
    return order[cuts[phase] : cuts[phase + 1]].tolist()


SPLITS = ["2,4,4", "1,1,1", "10,0,0", "0,5,5", "0.3,0,0.7", "1,2,3", "3,3,4", "6,2,2", "7,2,1"]
SPLITS += ["0.1,0.45,0.45", "1,0,0", "5,0,5", "9,1", "1,1", "2,3,5,7"]


def test_cut_points_match_deepspeed_chat_for_many_sizes_and_splits():
    checked = 0
    for split in SPLITS:
        weights = [float(w) for w in split.split(",")]
        for n in [*range(0, 400), 1001, 9999, 10007, 76256, 100_003]:
            expected = deepspeed_chat_cuts(n, split)
            if expected != sorted(expected) or expected[1] < 0:
                continue  # DeepSpeed-Chat's own partitions overlap here; see the next test
            assert partition_bounds(n, weights) == expected, (n, split)
            checked += 1
    assert checked > 0.95 * len(SPLITS) * 405


def test_only_deepspeed_chats_overlapping_cuts_are_changed():
    for split in SPLITS:
        weights = [float(w) for w in split.split(",")]
        for n in range(0, 400):
            expected = deepspeed_chat_cuts(n, split)
            if expected[1] < 0:  # only with a first weight of 0
                assert weights[0] == 0
                assert partition_bounds(n, weights) == [0, 0, *expected[2:]]


@pytest.mark.parametrize(
    ("n", "split", "phase1"),
    [(1001, "2,4,4", 201), (76_256, "2,4,4", 15_252), (7, "2,4,4", 1), (11, "1,1,1", 3)],
)
def test_phase_one_takes_the_same_rows_as_deepspeed_chat(n, split, phase1):
    """76,256 rows: Dahoas/rm-static's train split."""
    weights = [float(w) for w in split.split(",")]
    for seed in (1234, 42):
        for phase in range(3):
            got = partition(n, weights, seed, phase).tolist()
            assert got == deepspeed_chat_rows(n, split, seed, phase)
        assert len(partition(n, weights, seed, 0)) == phase1


def test_train_only_sources_split_nine_to_one_like_deepspeed_chat():
    """Sources without an eval split: DeepSpeed-Chat cuts their train rows 9,1 first."""
    for n in (10, 15, 25, 1001):
        for part in (0, 1):
            assert partition(n, [9.0, 1.0], 1234, part).tolist() == deepspeed_chat_rows(
                n, "9,1", 1234, part
            )


def test_partitions_depend_only_on_size_weights_and_seed():
    first = partition(50, [2, 4, 4], seed=3, index=0)
    assert first.tolist() == partition(50, [2, 4, 4], seed=3, index=0).tolist()
    assert first.tolist() != partition(50, [2, 4, 4], seed=4, index=0).tolist()


@pytest.mark.parametrize(("weight", "count"), [(0, 0), (0.5, 5), (1, 10), (2.5, 25)])
def test_resample_counts_and_copies(weight, count):
    picked = resample(10, weight, seed=1)
    assert len(picked) == count
    counts = np.bincount(picked, minlength=10)
    assert counts.max() - counts.min() <= 1  # whole copies first, then a subset without repeats


def write_source(folder, tag, n_train, n_eval):
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("eval", n_eval)):
        rows = [{"prompt": f" Human: {tag} {i}? Assistant:", "chosen": f" {i}."} for i in range(n)]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def origins(tok, rows):
    return [re.search(r"Human: (\w+)", tok.decode(r["input_ids"])).group(1) for r in rows]


def test_sft_only_sets_are_not_split(tmp_path, tiny_tokenizer):
    split_set = write_source(tmp_path / "a", "apple", 20, 10)
    sft_only = write_source(tmp_path / "b", "banana", 7, 3)
    cfg = DataConfig(
        data_path=[split_set],
        sft_only_data_path=[sft_only],
        data_split="2,4,4",
        data_output_path=str(tmp_path / "cache"),
    )
    data = build_sft_data(cfg, tiny_tokenizer, None)
    assert [(s.train_rows, s.eval_rows) for s in data.sources] == [(4, 2), (7, 3)]
    assert sorted(origins(tiny_tokenizer, data.train)) == ["apple"] * 4 + ["banana"] * 7


def test_per_source_weights_up_and_down_sample_training_rows(tmp_path, tiny_tokenizer):
    a = write_source(tmp_path / "a", "apple", 10, 2)
    b = write_source(tmp_path / "b", "banana", 10, 2)
    cfg = DataConfig(
        data_path=[f"{a}:0.5", f"{b}:2"],
        data_split="10,0,0",
        data_output_path=str(tmp_path / "cache"),
    )
    data = build_sft_data(cfg, tiny_tokenizer, None)
    train = origins(tiny_tokenizer, data.train)
    assert (train.count("apple"), train.count("banana")) == (5, 20)
    assert [s.train_rows for s in data.sources] == [5, 20]
    assert len(data.eval) == 4  # eval rows are never resampled
    assert data.sources[0].name == a


def test_a_zero_weight_source_still_contributes_eval_rows(tmp_path, tiny_tokenizer):
    a = write_source(tmp_path / "a", "apple", 10, 2)
    b = write_source(tmp_path / "b", "banana", 10, 2)
    cfg = DataConfig(
        data_path=[a, f"{b}:0"], data_split="10,0,0", data_output_path=str(tmp_path / "cache")
    )
    data = build_sft_data(cfg, tiny_tokenizer, None)
    assert set(origins(tiny_tokenizer, data.train)) == {"apple"}
    assert sorted(origins(tiny_tokenizer, data.eval)) == ["apple"] * 2 + ["banana"] * 2


def test_phase_one_rows_are_the_same_whatever_else_is_blended(tmp_path, tiny_tokenizer):
    """Each set is split on its own, so adding a set never reshuffles another's partition."""
    a = write_source(tmp_path / "a", "apple", 30, 10)
    b = write_source(tmp_path / "b", "banana", 30, 10)
    alone = build_sft_data(
        DataConfig(data_path=[a], data_split="2,4,4", data_output_path=str(tmp_path / "c1")),
        tiny_tokenizer,
        None,
    )
    both = build_sft_data(
        DataConfig(data_path=[a, b], data_split="2,4,4", data_output_path=str(tmp_path / "c2")),
        tiny_tokenizer,
        None,
    )

    def texts(rows, tag):
        return sorted(t for t in (tiny_tokenizer.decode(r["input_ids"]) for r in rows) if tag in t)

    assert texts(alone.train, "apple") == texts(both.train, "apple")
    assert len(texts(alone.train, "apple")) == 6
