"""Deterministic split and blend: pure functions of (sizes, weights, seed).

Indices come from numpy's legacy RandomState, whose streams are fixed across numpy
versions, so every run and every rank cuts the same partitions.
"""

from __future__ import annotations

import numpy as np

from utils.data.common import DataError

PHASES = 3


def parse_data_split(text: str) -> list[float]:
    """'2,4,4' -> [2.0, 4.0, 4.0]: one non-negative weight per training phase."""
    parts = [p.strip() for p in text.split(",")]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise DataError(
            f"--data_split {text!r}: weights must be numbers, e.g. '2,4,4' or '10,0,0'"
        ) from None
    if len(weights) != PHASES:
        raise DataError(
            f"--data_split {text!r}: give {PHASES} comma-separated weights (one per "
            "training phase), e.g. '2,4,4' or '10,0,0'"
        )
    if any(w < 0 or not np.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise DataError(
            f"--data_split {text!r}: weights must be finite, non-negative and sum to more "
            "than 0, e.g. '2,4,4' or '10,0,0'"
        )
    return weights


def partition_bounds(n: int, weights: list[float]) -> list[int]:
    """Cut points of contiguous partitions proportional to `weights`, summing exactly to n.

    DeepSpeed-Chat's arithmetic, so the same seed selects the same rows: every phase after
    the first gets round(share * n) rows (Python's round, half to even) and the first
    absorbs the rounding (n = 1001 with 2,4,4 gives 201, 400, 400). DeepSpeed-Chat's first
    cut can go negative (first weight 0, the other shares rounding up past n; its slices
    then wrap around and overlap): there the first phase gets no rows and the later phases
    keep DeepSpeed-Chat's cuts, so the partitions stay disjoint.
    """
    total = float(sum(weights))
    bounds = [n]
    for w in reversed(weights[1:]):
        # Share first, then times n: DeepSpeed-Chat's float operations, so ties round alike.
        bounds.append(bounds[-1] - round(float(w) / total * float(n)))
    bounds[-1] = max(bounds[-1], 0)
    return [0, *reversed(bounds)]


def partition(n: int, weights: list[float], seed: int, index: int) -> np.ndarray:
    """Row indices of partition `index` after a seeded shuffle of range(n)."""
    order = np.random.RandomState(seed).permutation(n)
    bounds = partition_bounds(n, weights)
    return order[bounds[index] : bounds[index + 1]]


def resample(n: int, weight: float, seed: int) -> np.ndarray:
    """Indices for up/down-sampling n rows by `weight`: whole copies plus a seeded subset."""
    count = int(np.floor(n * weight + 0.5))
    copies, rest = divmod(count, n) if n else (0, 0)
    subset = np.random.RandomState(seed).choice(n, rest, replace=False) if rest else []
    return np.concatenate([np.tile(np.arange(n), copies), np.asarray(subset, dtype=np.int64)])


def shuffled(n: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).permutation(n)
