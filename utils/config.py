"""Command line and typed configuration.

The flag names, meanings and defaults are DeepSpeed-Chat step 1's, so existing
launch scripts keep working. Flags are parsed once into small dataclasses grouped
by concern; every other module takes the smallest group it needs, never `args`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields

from utils.errors import UserError

SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)
DTYPES = ("auto", "fp32", "fp16", "bf16")
LOSS_ON = ("all", "response")
LOSS_AVERAGING = ("token", "micro_batch")


class ConfigError(UserError):
    """A flag value that cannot work; the message names the flag and the fix."""


@dataclass
class ModelConfig:
    model_name_or_path: str
    dropout: float | None = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    compute_fp32_loss: bool = False
    add_eot_token: bool = False
    eot_token: str = "<|endoftext|>"


@dataclass
class DataConfig:
    data_path: list[str] = field(default_factory=lambda: ["Dahoas/rm-static"])
    data_split: str = "2,4,4"
    sft_only_data_path: list[str] = field(default_factory=list)
    data_output_path: str = ""
    max_seq_len: int = 512
    seed: int = 1234
    eot_token: str = "<|endoftext|>"
    rebuild_data_cache: bool = False
    num_proc: int = 0  # tokenising processes; 0 picks by data size


@dataclass
class BatchConfig:
    """How rows become micro-batches, which tokens the loss covers, how speed is reported."""

    pad_to_max_len: bool = False  # DeepSpeed-Chat's fixed-length padding (for comparison)
    packing: bool = False  # several examples per row, attention kept inside each
    loss_on: str = "all"  # "all" non-pad tokens, or only the "response" tokens
    loss_averaging: str = "token"  # "token": over a step's tokens; "micro_batch": DS-Chat's
    peak_tflops: float | None = None  # accelerator peak for MFU; None looks it up


@dataclass
class LoraConfig:
    lora_dim: int = 0
    lora_module_name: str = "decoder.layers."
    only_optimize_lora: bool = False
    lora_learning_rate: float = 5e-4
    save_lora_adapter: bool = False

    @property
    def enabled(self) -> bool:
        return self.lora_dim > 0


@dataclass
class TrainConfig:
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    num_train_epochs: int = 1
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "cosine"
    num_warmup_steps: int = 0
    max_steps: int | None = None
    seed: int = 1234
    output_dir: str | None = None
    print_loss: bool = False
    dry_run: bool = False

    def micro_batches_per_epoch(self, train_rows: int, world_size: int) -> int:
        return -(-train_rows // (self.per_device_train_batch_size * world_size))

    def total_steps(self, train_rows: int, world_size: int) -> int:
        """Optimizer steps of the run. DeepSpeed counts accumulation across epoch ends, so
        this is all micro-batches of all epochs over the accumulation, not per epoch."""
        micro = self.num_train_epochs * self.micro_batches_per_epoch(train_rows, world_size)
        total = max(1, micro // self.gradient_accumulation_steps)
        return min(total, self.max_steps) if self.max_steps else total


@dataclass
class EngineConfig:
    zero_stage: int = 0
    offload: bool = False
    dtype: str = "auto"
    enable_tensorboard: bool = False
    tensorboard_path: str = "step1_tensorboard"
    deepspeed_config: str | None = None
    local_rank: int = -1

    def global_batch(self, micro_batch: int, world_size: int, accumulation: int) -> int:
        return micro_batch * world_size * accumulation


@dataclass
class CheckpointConfig:
    save_steps: int = 0  # 0: no periodic or epoch-end checkpoints (preemption still saves)
    save_total_limit: int | None = None  # None keeps every checkpoint
    resume_from_checkpoint: str | None = None  # a checkpoint folder, an output folder, or "auto"


@dataclass
class PlannerConfig:
    estimate_memory: bool = False
    gpu_memory_gb: float = 80.0
    num_gpus_per_node: int = 1
    num_nodes: int = 1

    @property
    def world_size(self) -> int:
        return self.num_gpus_per_node * self.num_nodes


@dataclass
class Config:
    model: ModelConfig
    data: DataConfig
    lora: LoraConfig
    train: TrainConfig
    engine: EngineConfig
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Supervised fine-tuning of a causal language model with DeepSpeed "
        "(DeepSpeed-Chat step 1 compatible command line)."
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--data_path",
        nargs="*",
        default=["Dahoas/rm-static"],
        help="Data sets: hub names (e.g. Dahoas/rm-static), 'local/jsonfile', or local "
        "files/folders. Several are blended; NAME:WEIGHT (e.g. Dahoas/rm-static:0.5) "
        "up- or down-samples one set's training rows.",
    )
    d.add_argument(
        "--data_split",
        type=str,
        default="2,4,4",
        help="Comma-separated weights splitting each data set between the three "
        "training phases; SFT uses the first. '10,0,0' uses every row for SFT.",
    )
    d.add_argument(
        "--sft_only_data_path",
        nargs="*",
        default=[],
        help="Data sets used only for SFT: not split, every row trains.",
    )
    d.add_argument(
        "--data_output_path",
        type=str,
        default=None,
        help="Where the tokenised-data cache lives (default: a per-user cache folder).",
    )
    d.add_argument(
        "--rebuild_data_cache",
        action="store_true",
        help="Ignore any cached tokenised data and build it again.",
    )
    d.add_argument(
        "--data_num_proc",
        type=int,
        default=0,
        help="Processes that tokenise the data (default 0: several only for large data).",
    )
    d.add_argument(
        "--max_seq_len",
        type=int,
        default=512,
        help="Longest sequence in tokens; longer examples are truncated.",
    )

    m = p.add_argument_group("model")
    m.add_argument(
        "--model_name_or_path",
        type=str,
        required=True,
        help="A hub model name or a local folder with a saved model and tokenizer.",
    )
    m.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="Allow model code from the model's repository (off by default: it runs code).",
    )
    m.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="Override the model's dropout probabilities (default: the model's own).",
    )
    m.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute activations in the backward pass to save memory.",
    )
    m.add_argument(
        "--compute_fp32_loss",
        action="store_true",
        help="Compute the loss in fp32 even when training in fp16/bf16.",
    )
    m.add_argument(
        "--add_eot_token",
        action="store_true",
        help="Add --eot_token to the tokenizer as a special token.",
    )
    m.add_argument(
        "--eot_token",
        type=str,
        default="<|endoftext|>",
        help="End-of-conversation token appended to every example.",
    )

    t = p.add_argument_group("training")
    t.add_argument("--per_device_train_batch_size", type=int, default=16)
    t.add_argument("--per_device_eval_batch_size", type=int, default=16)
    t.add_argument(
        "--learning_rate", type=float, default=1e-3, help="Initial learning rate (after warmup)."
    )
    t.add_argument("--weight_decay", type=float, default=0.0)
    t.add_argument("--num_train_epochs", type=int, default=1)
    t.add_argument("--gradient_accumulation_steps", type=int, default=1)
    t.add_argument("--lr_scheduler_type", type=str, default="cosine", choices=SCHEDULERS)
    t.add_argument("--num_warmup_steps", type=int, default=0)
    t.add_argument(
        "--max_steps",
        type=int,
        default=None,
        help="Stop after this many optimizer steps (smoke runs).",
    )
    t.add_argument(
        "--output_dir", type=str, default=None, help="Where the fine-tuned model is written."
    )
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--print_loss", action="store_true", help="Print the loss of every step.")
    t.add_argument(
        "--dry_run",
        action="store_true",
        help="Validate, build data and model config, print a JSON summary, do not train.",
    )

    _add_batch_arguments(p)

    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora_dim", type=int, default=0, help="LoRA rank; > 0 enables LoRA.")
    lo.add_argument(
        "--lora_module_name",
        type=str,
        default="decoder.layers.",
        help="LoRA wraps every linear layer whose qualified name contains this.",
    )
    lo.add_argument(
        "--only_optimize_lora",
        action="store_true",
        help="Train only the LoRA weights; freeze the rest.",
    )
    lo.add_argument("--lora_learning_rate", type=float, default=5e-4)
    lo.add_argument(
        "--save_lora_adapter",
        action="store_true",
        help="Also write the PEFT adapter folder (output_dir/lora_adapter); the "
        "model itself is always saved with LoRA merged into its weights.",
    )

    pl = p.add_argument_group("memory planner")
    pl.add_argument(
        "--estimate_memory",
        action="store_true",
        help="Print the per-GPU/per-node memory this run needs and the largest model "
        "of the same family that fits --gpu_memory_gb; loads no data or weights.",
    )
    pl.add_argument(
        "--gpu_memory_gb",
        type=float,
        default=80.0,
        help="GPU memory per device the planner fits the largest model into.",
    )
    pl.add_argument(
        "--num_gpus_per_node",
        type=int,
        default=1,
        help="GPUs per node the planner assumes (the launcher's --num_gpus).",
    )
    pl.add_argument("--num_nodes", type=int, default=1, help="Nodes the planner assumes.")

    e = p.add_argument_group("engine")
    e.add_argument("--local_rank", type=int, default=-1, help="Set by the DeepSpeed launcher.")
    e.add_argument("--zero_stage", type=int, default=0, help="ZeRO stage: 0, 1, 2 or 3.")
    e.add_argument(
        "--offload",
        action="store_true",
        help="Offload optimizer states (and parameters at ZeRO-3) to CPU memory.",
    )
    e.add_argument(
        "--dtype",
        type=str,
        default="auto",
        choices=DTYPES,
        help="Training precision; 'auto' picks bf16/fp16 on GPUs and fp32 on CPU.",
    )
    e.add_argument("--enable_tensorboard", action="store_true")
    e.add_argument("--tensorboard_path", type=str, default="step1_tensorboard")
    _add_checkpoint_arguments(p)
    _add_deepspeed_arguments(p)
    return p


def _add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    c = parser.add_argument_group("checkpointing")
    c.add_argument(
        "--save_steps",
        type=int,
        default=0,
        help="Write a resumable DeepSpeed checkpoint under --output_dir every N optimizer "
        "steps and at each epoch end (default 0: only when preempted by SIGTERM/SIGUSR1).",
    )
    c.add_argument(
        "--save_total_limit",
        type=int,
        default=None,
        help="Keep only the newest K checkpoints (default: keep all).",
    )
    c.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="Continue a run exactly: a checkpoint folder, or 'auto' for the newest complete "
        "checkpoint in --output_dir (starts fresh when there is none).",
    )


def _add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    b = parser.add_argument_group("batching and loss")
    b.add_argument(
        "--pad_to_max_len",
        action="store_true",
        help="Pad every example to --max_seq_len like DeepSpeed-Chat (slow; for comparison). "
        "Default: batches of similar lengths, padded to their longest example.",
    )
    b.add_argument(
        "--packing",
        action="store_true",
        help="Pack several examples into each row of up to --max_seq_len tokens; attention "
        "stays inside each example. --per_device_train_batch_size then counts packed rows.",
    )
    b.add_argument(
        "--loss_on",
        choices=LOSS_ON,
        default="all",
        help="'all': every non-pad token (DeepSpeed-Chat); 'response': mask the prompt tokens.",
    )
    b.add_argument(
        "--loss_averaging",
        choices=LOSS_AVERAGING,
        default="token",
        help="'token': a step's loss is the mean over all its trained tokens, across "
        "micro-batches and ranks; 'micro_batch': mean of per-micro-batch means (DeepSpeed-Chat).",
    )
    b.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="Peak TFLOP/s of one accelerator, for the MFU in the throughput log "
        "(default: looked up for known GPUs).",
    )


def _add_deepspeed_arguments(parser: argparse.ArgumentParser) -> None:
    """DeepSpeed's own --deepspeed/--deepspeed_config flags, added by DeepSpeed itself."""
    import deepspeed

    deepspeed.add_config_arguments(parser)


def parse_args(argv: list[str] | None = None) -> Config:
    args = build_parser().parse_args(argv)
    return Config(
        model=_from_args(ModelConfig, args),
        data=_from_args(
            DataConfig,
            args,
            data_path=list(args.data_path),
            sft_only_data_path=list(args.sft_only_data_path),
            data_output_path=args.data_output_path or default_cache_dir(),
            num_proc=args.data_num_proc,
        ),
        lora=_from_args(LoraConfig, args),
        train=_from_args(TrainConfig, args),
        engine=_from_args(EngineConfig, args),
        checkpoint=_from_args(CheckpointConfig, args),
        planner=_from_args(PlannerConfig, args),
        batch=_from_args(BatchConfig, args),
    )


def _from_args(cls, args: argparse.Namespace, **overrides):
    """`cls` filled from the flags of the same names (config fields are named after flags)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def default_cache_dir() -> str:
    """Per-user cache (never a world-writable /tmp folder another user could plant files in)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sft-deepspeed", "data")
