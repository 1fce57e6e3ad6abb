"""Types shared by the data stages: the error, the per-source report and the result."""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import Dataset

from utils.errors import UserError

IGNORE_INDEX = -100
"""Label value the loss ignores (prompt and padding positions); the collator uses it."""

FORMAT_VERSION = 2
"""Bump when the tokenised layout or the rows a split selects change, so that old caches
are never reused (2: --data_split cuts follow DeepSpeed-Chat's rounding)."""


class DataError(UserError):
    """A data source that cannot be used; the message names the source and the fix."""


@dataclass
class SourceStats:
    """What one data source contributed to the SFT data, for the run summary."""

    name: str
    train_rows: int = 0
    eval_rows: int = 0
    skipped_rows: int = 0
    truncated_rows: int = 0
    train_tokens: int = 0


@dataclass
class SFTData:
    """Tokenised phase-1 data: rows are {"input_ids": list[int], "prompt_len": int}."""

    train: Dataset
    eval: Dataset
    sources: list[SourceStats] = field(default_factory=list)
    cache_key: str = ""  # of the cache entry: sources' contents, split, seed, tokenizer, length

    @property
    def train_tokens(self) -> int:
        return sum(s.train_tokens for s in self.sources)
