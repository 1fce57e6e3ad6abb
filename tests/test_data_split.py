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
        if w == 0:
            assert size == 0


def test_partition_sizes_for_odd_counts():
    assert partition_bounds(7, [2, 4, 4]) == [0, 1, 4, 7]  # 1.4 -> 1, 4.2 -> 4
    assert partition_bounds(11, [1, 1, 1]) == [0, 4, 7, 11]
    assert partition_bounds(5, [10, 0, 0]) == [0, 5, 5, 5]


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
    data = build_sft_data(cfg, tiny_tokenizer)
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
    data = build_sft_data(cfg, tiny_tokenizer)
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
    data = build_sft_data(cfg, tiny_tokenizer)
    assert set(origins(tiny_tokenizer, data.train)) == {"apple"}
    assert sorted(origins(tiny_tokenizer, data.eval)) == ["apple"] * 2 + ["banana"] * 2


def test_phase_one_rows_are_the_same_whatever_else_is_blended(tmp_path, tiny_tokenizer):
    """Each set is split on its own, so adding a set never reshuffles another's partition."""
    a = write_source(tmp_path / "a", "apple", 30, 10)
    b = write_source(tmp_path / "b", "banana", 30, 10)
    alone = build_sft_data(
        DataConfig(data_path=[a], data_split="2,4,4", data_output_path=str(tmp_path / "c1")),
        tiny_tokenizer,
    )
    both = build_sft_data(
        DataConfig(data_path=[a, b], data_split="2,4,4", data_output_path=str(tmp_path / "c2")),
        tiny_tokenizer,
    )

    def texts(rows, tag):
        return sorted(t for t in (tiny_tokenizer.decode(r["input_ids"]) for r in rows) if tag in t)

    assert texts(alone.train, "apple") == texts(both.train, "apple")
    assert len(texts(alone.train, "apple")) == 6
