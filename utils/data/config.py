"""The data layer's settings: where rows come from, how they are split, cut and batched.

Each field is also the command-line flag of the same name (see utils/flags.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from utils.flags import flag

LOSS_ON = ("all", "response")
DSCHAT = "dschat"  # --chat_template's default: DeepSpeed-Chat's " Human: … Assistant: …" format
DEFAULT_EOT = "<|endoftext|>"


def default_cache_dir() -> str:
    """Per-user cache (never a world-writable /tmp folder another user could plant files in)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sft-deepspeed", "data")


@dataclass(frozen=True)
class BatchGeometry:
    """How many rows one optimizer step trains: micro-batch x ranks x accumulation."""

    micro: int
    world_size: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.world_size * self.accumulation

    def __str__(self) -> str:
        return f"{self.micro} x {self.world_size} x {self.accumulation} = {self.global_batch}"


@dataclass(kw_only=True)
class DataConfig:
    data_path: list[str] = flag(
        default_factory=lambda: ["Dahoas/rm-static"],
        help="Data sets: hub names (e.g. Dahoas/rm-static), 'local/jsonfile', or local "
        "files/folders. Several are blended; NAME:WEIGHT (e.g. Dahoas/rm-static:0.5) "
        "up- or down-samples one set's training rows.",
    )
    data_split: str = flag(
        "2,4,4",
        "Comma-separated weights splitting each data set between the three training phases; "
        "SFT uses the first. '10,0,0' uses every row for SFT.",
    )
    sft_only_data_path: list[str] = flag(
        default_factory=list, help="Data sets used only for SFT: not split, every row trains."
    )
    data_output_path: str = flag(
        default_factory=default_cache_dir, help="Where the tokenised-data cache lives."
    )
    rebuild_data_cache: bool = flag(False, "Ignore any cached tokenised data and build it again.")
    data_num_proc: int = flag(
        0, "Processes that tokenise the data (0: several only for large data)."
    )
    seed: int = flag(
        1234,
        "Seed of the data split, the training order, the model's dropout and everything random.",
    )
    max_seq_len: int = flag(512, "Longest sequence in tokens; longer examples are truncated.")
    eot_token: str = flag(
        DEFAULT_EOT,
        "End-of-conversation token appended to every example, where generation stops "
        "(--chat_template dschat only: a template ends each turn itself).",
    )
    add_eot_token: bool = flag(
        False, "Add --eot_token to the tokenizer as a special token (--chat_template dschat only)."
    )
    chat_template: str = flag(
        DSCHAT,
        "How conversations are written: 'dschat' (DeepSpeed-Chat's ' Human: … Assistant: …', "
        "trains the last answer), 'model' (the tokenizer's own chat template) or the path of a "
        "Jinja file. A template renders every data set as conversations and trains every "
        "assistant turn; the saved model carries it.",
    )
    system_prompt: str | None = flag(
        None,
        "System turn added to every conversation that has none (needs --chat_template; a "
        "row's own system turn or 'system' column wins).",
    )

    @property
    def added_token(self) -> str | None:
        """The token the tokenizer must learn as a special one (--add_eot_token), if any."""
        return self.eot_token if self.add_eot_token else None


@dataclass(kw_only=True)
class BatchConfig:
    """How rows become micro-batches and which of their tokens the loss covers."""

    pad_to_max_len: bool = flag(
        False,
        "Pad every example to --max_seq_len like DeepSpeed-Chat (slow; for comparison). "
        "Default: batches of similar lengths, padded to their longest example.",
    )
    packing: bool = flag(
        False,
        "Pack several examples into each row of up to --max_seq_len tokens; attention stays "
        "inside each example. --per_device_train_batch_size then counts packed rows.",
    )
    loss_on: str | None = flag(
        None,
        "'all': every non-pad token; 'response': only the answers (with a chat template: "
        "every assistant turn and its end-of-turn token). Default: 'all' with --chat_template "
        "dschat (DeepSpeed-Chat), 'response' with a template.",
        choices=LOSS_ON,
    )
    dataloader_num_workers: int | None = flag(
        None,
        "Processes that collate training micro-batches, started by spawn (0: the training "
        "process does it). Default: 2 for --packing with attention masks on a GPU (costly "
        "to build), else 0 (about a millisecond a micro-batch).",
    )


def effective_loss_on(loss_on: str | None, chat_template: str) -> str:
    """The tokens the loss covers, decided here once: an explicit --loss_on wins; otherwise
    every token for DeepSpeed-Chat's format and the assistant turns for a chat template."""
    if loss_on is not None:
        return loss_on
    return "all" if chat_template == DSCHAT else "response"
