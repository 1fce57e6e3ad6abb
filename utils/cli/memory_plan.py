"""--estimate_memory: the planner (utils/planner/) sizes the run the flags and the resolved
setup describe, from the model's config alone."""

from __future__ import annotations

from dataclasses import replace

from utils.config import Config
from utils.planner.estimate import PlanInputs
from utils.planner.report import estimate_memory, format_memory_plan
from utils.run_setup import RunSetup


def memory_plan_report(cfg: Config, setup: RunSetup) -> str:
    """--estimate_memory's output: a per-GPU / per-node table, then its JSON line."""
    inputs = plan_inputs(cfg, setup)
    return format_memory_plan(estimate_memory(inputs, setup.model_config), inputs)


def plan_inputs(cfg: Config, setup: RunSetup) -> PlanInputs:
    """The run to plan: at the ZeRO stage and offload DeepSpeed will use (a --deepspeed_config
    may override the flags), with the loss the run computes. The precision stays --dtype,
    'auto' meaning the 16 bits GPUs train in: the plan is for the GPUs it describes, not for
    this machine."""
    engine = replace(
        cfg.engine,
        zero_stage=setup.engine.zero_stage,
        offload=setup.engine.offload,
        dtype="bf16" if cfg.engine.dtype == "auto" else cfg.engine.dtype,
    )
    return PlanInputs(
        engine=engine,
        lora=cfg.lora,
        planner=cfg.planner,
        micro_batch=cfg.train.per_device_train_batch_size,
        seq_len=cfg.data.max_seq_len,
        checkpointing=cfg.model.gradient_checkpointing,
        loss_mode=setup.loss.kind,
        trust_remote_code=cfg.model.trust_remote_code,
    )
