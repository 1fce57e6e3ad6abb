"""The settings a checkpoint records, and the one rule for resuming it: change nothing that
decides the data, its order or the optimisation.

Each checkpoint's run_state.json holds `run_settings(cfg, ...)` (RECORDED): the data (sources as written,
split, seed, length, and the tokenised-data cache key, which also covers the files' contents
and the tokenizer), the batch geometry, epochs and --max_steps (they set the schedule's
length), the learning rates, weight decay, scheduler and warm-up (DeepSpeed restores the
optimizer's and scheduler's saved values, so a new one would be silently ignored), and how
batches and the loss are made. A resume that changes any of them is refused, listing each
change with the value to pass. Settings that only change logging or saving stay free.

The elastic exception: world size, micro-batch and accumulation may change together while
the global batch (micro x ranks x accumulation) stays the same; the ZeRO stage is free.
Then every optimizer step trains as many rows as before and the schedule keeps its length
(steps per epoch = ceil(rows / global batch)).
"""

from __future__ import annotations

from typing import Any

from utils.data.config import BatchGeometry

# What a checkpoint records of the run's flags, by settings group (Config's, utils/config.py)
# and flag name: what decides the data, its order and the optimisation. Recording one more
# setting is one more name here.
RECORDED = {
    "data": (
        "data_path",
        "sft_only_data_path",
        "data_split",
        "seed",
        "max_seq_len",
        "eot_token",
        "chat_template",
        "system_prompt",
    ),
    "train": (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "max_steps",
        "learning_rate",
        "weight_decay",
        "lr_scheduler_type",
        "num_warmup_steps",
        "loss_averaging",
    ),
    "lora": ("lora_dim", "lora_module_name", "only_optimize_lora", "lora_learning_rate"),
    "batch": ("packing", "pad_to_max_len", "loss_on"),
}
GEOMETRY = ("per_device_train_batch_size", "world_size", "gradient_accumulation_steps")
DATA = RECORDED["data"]
DATA_KEY = "data_cache_key"
LORA_ONLY = ("lora_module_name", "lora_learning_rate")  # unused without LoRA


def run_settings(cfg: Any, data_key: str, world_size: int) -> dict[str, Any]:
    """What a checkpoint records of run `cfg` (its Config): JSON values keyed by flag name
    without the dashes, the tokenised data's cache key and the number of ranks."""
    settings = {
        name: _as_json(getattr(getattr(cfg, group), name))
        for group, names in RECORDED.items()
        for name in names
    }
    return {**settings, DATA_KEY: data_key, "world_size": world_size}


def _as_json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


def settings_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Each change a resume with `current` would make to the run `saved` describes."""
    changes = []
    for name, old in saved.items():
        new = current.get(name)
        if name in GEOMETRY or name == DATA_KEY or new == old:
            continue
        if name in LORA_ONLY and not (saved.get("lora_dim") and current.get("lora_dim")):
            continue  # LoRA's own settings change nothing without LoRA (--lora_dim says it)
        changes.append(
            f"--{name} {_show(old)} in the checkpoint, {_show(new)} now: {_fix(name, old)}"
        )
    data_named = any(saved.get(name) != current.get(name) for name in DATA)
    if saved.get(DATA_KEY) != current.get(DATA_KEY) and not data_named:
        changes.append(
            f"the training data changed (tokenised-data cache key {saved.get(DATA_KEY)} in the "
            f"checkpoint, {current.get(DATA_KEY)} now): the contents of a --data_path source, "
            "the tokenizer or the --chat_template file differ; resume with the data, tokenizer "
            "and template the run was trained on"
        )
    return changes + _global_batch_changes(saved, current)


def geometry(settings: dict[str, Any]) -> BatchGeometry:
    """The batch geometry recorded in (or about to be recorded in) a checkpoint."""
    return BatchGeometry(*(settings[name] for name in GEOMETRY))


def _global_batch_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    old, new = geometry(saved), geometry(current)
    total = old.global_batch
    if new.global_batch == total:
        return []
    micro, accumulation, world = old.micro, old.accumulation, new.world_size
    ranks = f"{world} rank" if world == 1 else f"{world} ranks"
    change = (
        "global batch (--per_device_train_batch_size x ranks x --gradient_accumulation_steps) "
        f"{old} in the checkpoint, {new} now: "
    )
    if total % world:
        return [
            change + f"{total} rows per step cannot be shared by {ranks}; run on a number "
            f"of ranks that divides {total} (e.g. {old.world_size})"
        ]
    per_rank = total // world
    if per_rank % accumulation == 0:  # keep accumulation (and so rows per micro-step if it can)
        micro, accumulation = per_rank // accumulation, accumulation
    elif per_rank % micro == 0:
        accumulation = per_rank // micro
    else:
        micro, accumulation = per_rank, 1
    return [
        change + f"keep it with --per_device_train_batch_size {micro} "
        f"--gradient_accumulation_steps {accumulation} on {ranks}"
    ]


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == []:
        return "unset"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def _fix(name: str, old: Any) -> str:
    if old is True:
        return f"add --{name}"
    if old is False or old is None or old == []:
        return f"leave out --{name}"
    return f"pass --{name} {_show(old)}"
