"""Types shared by the data stages: the error, the per-source report and the result."""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import Dataset

from utils.errors import UserError

IGNORE_INDEX = -100
"""Label value the loss ignores (prompt and padding positions); the collator uses it."""

FORMAT_VERSION = 3
"""Bump when the tokenised layout or the rows a split selects change, so that old caches
are never reused (2: --data_split cuts follow DeepSpeed-Chat's rounding; 3: rows carry
`loss_spans`, the trained token ranges, instead of `prompt_len`)."""


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
    # Skipped rows by reason ("no assistant turn", ...), and the first such row's detail.
    skip_reasons: dict[str, int] = field(default_factory=dict)
    skip_examples: dict[str, str] = field(default_factory=dict)

    def add_skips(self, reason: str, count: int, example: str = "") -> None:
        if count:
            self.skipped_rows += count
            self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + count
            self.skip_examples.setdefault(reason, example)

    def describe_skips(self) -> list[str]:
        """One line per reason: how many rows, why, and the first such row's detail."""
        return [
            f"{count:,} {'row' if count == 1 else 'rows'}: {reason}"
            + (f" (first: {self.skip_examples[reason]})" if self.skip_examples.get(reason) else "")
            for reason, count in self.skip_reasons.items()
        ]


@dataclass
class SFTData:
    """Tokenised phase-1 data: rows are {"input_ids": list[int], "loss_spans": [[start, end]]}.

    `loss_spans` are the [start, end) token positions --loss_on response trains: the
    response of a DeepSpeed-Chat row, every assistant turn of a chat-template row.
    """

    train: Dataset
    eval: Dataset
    sources: list[SourceStats] = field(default_factory=list)
    cache_key: str = ""  # of the cache entry: sources' contents, split, seed, tokenizer, length

    @property
    def train_tokens(self) -> int:
        return sum(s.train_tokens for s in self.sources)
