"""Settings of training: the optimisation and the DeepSpeed engine.

Each field is also the command-line flag of the same name (see utils/flags.py); names and
defaults are DeepSpeed-Chat step 1's where it has the flag.
"""

from __future__ import annotations

from dataclasses import dataclass

from utils.data.config import BatchGeometry
from utils.flags import declared_elsewhere, flag

SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)
DTYPES = ("auto", "fp32", "fp16", "bf16")
LOSS_AVERAGING = ("token", "micro_batch")


@dataclass(kw_only=True)
class TrainConfig:
    per_device_train_batch_size: int = flag(16, "Training micro-batch per device.")
    per_device_eval_batch_size: int = flag(16, "Evaluation micro-batch per device.")
    learning_rate: float = flag(1e-3, "Initial learning rate (after warmup).")
    weight_decay: float = flag(0.0, "AdamW weight decay (never on biases and norm weights).")
    num_train_epochs: int = flag(1, "Passes over the training data.")
    gradient_accumulation_steps: int = flag(1, "Micro-batches per optimizer step.")
    lr_scheduler_type: str = flag("cosine", "Learning-rate schedule.", choices=SCHEDULERS)
    num_warmup_steps: int = flag(0, "Optimizer steps of linear learning-rate warmup.")
    max_steps: int | None = flag(None, "Stop after this many optimizer steps (smoke runs).")
    output_dir: str | None = flag(None, "Where the fine-tuned model is written.")
    loss_averaging: str = flag(
        "token",
        "'token': a step's loss is the mean over all its trained tokens, across micro-batches "
        "and ranks; 'micro_batch': mean of per-micro-batch means (DeepSpeed-Chat).",
        choices=LOSS_AVERAGING,
    )
    dry_run: bool = flag(
        False, "Validate, build data and model config, print a JSON summary, do not train."
    )

    def geometry(self, world_size: int) -> BatchGeometry:
        """This run's batch geometry on `world_size` ranks."""
        return BatchGeometry(
            self.per_device_train_batch_size, world_size, self.gradient_accumulation_steps
        )


@dataclass(kw_only=True)
class EngineConfig:
    zero_stage: int = flag(0, "ZeRO stage: 0, 1, 2 or 3.")
    offload: bool = flag(
        False, "Offload optimizer states (and parameters at ZeRO-3) to CPU memory."
    )
    dtype: str = flag(
        "auto",
        "Training precision; 'auto' picks bf16/fp16 on GPUs and fp32 on CPU.",
        choices=DTYPES,
    )
    local_rank: int = flag(-1, "Set by the DeepSpeed launcher.")
    dist_timeout_minutes: float = flag(
        10.0,
        "Minutes a rank waits inside a collective for the others before the run stops (a "
        "rank that died or hung). Waits for rank 0's own work (data cache, saving) end as "
        "soon as rank 0 fails or exits, else after 6 hours.",
    )
    # --deepspeed_config (a JSON file merged over the flags' config) is DeepSpeed's own flag.
    deepspeed_config: str | None = declared_elsewhere(None, by="deepspeed.add_config_arguments")
