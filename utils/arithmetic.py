"""Integer arithmetic used by batching, step counting and embedding sizes."""

from __future__ import annotations


def ceil_div(numerator: int, denominator: int) -> int:
    """Integer ceiling of numerator / denominator (exact at any size, unlike math.ceil of a float)."""
    return -(-numerator // denominator)


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least `value`."""
    return ceil_div(value, multiple) * multiple
