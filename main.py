#!/usr/bin/env python
"""Supervised fine-tuning of a causal language model with DeepSpeed.

DeepSpeed-Chat step 1's command line, e.g.

    deepspeed main.py --model_name_or_path facebook/opt-1.3b --data_path Dahoas/rm-static \
        --zero_stage 2 --output_dir ./output

Runs under `deepspeed`, `torchrun` or plain `python` (a one-rank group).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import deepspeed
from torch.utils.data import DataLoader
from transformers import set_seed

from utils.checkpoint.checkpointer import Checkpointer, build_checkpointer
from utils.checkpoint.preemption import PREEMPTED_EXIT
from utils.checkpoint.settings import run_settings
from utils.cli.failures import explain_failures, quiet_library_noise
from utils.cli.memory_plan import memory_plan_report
from utils.cli.parse import parse_args
from utils.cli.summary import count_tokens, print_run_summary
from utils.cli.validate import validate
from utils.config import Config
from utils.data.build import build_sft_data
from utils.data.common import SFTData
from utils.data.labels import check_trained_tokens
from utils.data.loaders import build_eval_loader, build_train_loader
from utils.distributed import (
    DistInfo,
    init_distributed,
    is_main_process,
    print_rank_0,
    rank_zero_first,
)
from utils.engine.accumulation import StepPlan
from utils.engine.ds_config import EngineSetup
from utils.engine.loop import TrainLoop, train
from utils.engine.optim import build_optimizer, build_param_groups, build_scheduler
from utils.engine.precision import TORCH_DTYPES
from utils.errors import UserError
from utils.model.load import build_model, count_parameters
from utils.model.lora import apply_lora
from utils.model.publish import recover_interrupted_save
from utils.model.save import check_disk_space, save_hf_model
from utils.model.serving import carry_chat_template
from utils.model.verify import verify_saved_model
from utils.observe.progress import build_monitor
from utils.observe.throughput import build_meter
from utils.run_setup import RunSetup


def main(argv: list[str] | None = None) -> int:
    cfg = setup = None
    # An error ends the run naming this rank; out of memory, with the flags that would fit,
    # judged by the resolved setup once there is one (read when the error happens).
    with explain_failures(lambda: (cfg, setup)):
        try:
            cfg = parse_args(argv)
            quiet_library_noise(is_main_process(), interactive=sys.stdout.isatty())
            dist = init_distributed(cfg.engine.local_rank, cfg.engine.dist_timeout_minutes)
            setup = validate(cfg, dist)  # everything start-up decides, each thing once
            if cfg.planner.estimate_memory:  # from the model's config alone: no data, no weights
                print_rank_0(memory_plan_report(cfg, setup))
                return 0
            set_seed(cfg.data.seed)
            with rank_zero_first("build the data cache"):  # the others then read the cache
                data = build_sft_data(cfg.data, setup.tokenizer, setup.template)
            check_trained_tokens(data, cfg.batch.loss_on, cfg.data.max_seq_len)
            train_loader, eval_loader = build_loaders(cfg, data, setup, dist)
            plan = build_step_plan(cfg, train_loader)
            if cfg.train.dry_run:
                return dry_run(cfg, data, setup, plan)
            prepare_output_dir(cfg.train.output_dir, dist)
            # Before the model loads: a checkpoint this run cannot continue is refused cheaply.
            checkpointer = build_checkpointer(
                cfg.checkpoint,
                cfg.train.output_dir,
                recorded_settings(cfg, data, setup),
                dist,
                planned_model=lambda: load_model(cfg, setup, on_meta=True),
            )
            model = load_model(cfg, setup)
            check_disk_space(model, cfg.train.output_dir, "Nothing has been trained yet.")
            print_run_summary(cfg, data, count_parameters(model), setup, plan)
            loop = build_loop(
                cfg, setup, model, train_loader, eval_loader, plan, checkpointer, dist
            )
            if train(loop, cfg.train).preempted:  # its checkpoint is written: resume it later
                return PREEMPTED_EXIT
            save_model(cfg, setup, loop)
            return 0
        except UserError as err:  # a mistake the user can fix: one message, no traceback
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 2


def build_loaders(cfg: Config, data: SFTData, setup: RunSetup, dist: DistInfo):
    """This rank's training micro-batches and its share of the eval rows."""
    geometry = {"pad_token_id": setup.tokenizer.pad_token_id, "rank": dist.rank}
    geometry |= {"world_size": dist.world_size, "on_gpu": dist.device.type == "cuda"}
    train_loader = build_train_loader(
        data.train,
        cfg.batch,
        micro_batch=setup.engine.config["train_micro_batch_size_per_gpu"],
        max_seq_len=cfg.data.max_seq_len,
        seed=cfg.data.seed,
        mask_dtype=TORCH_DTYPES[setup.engine.dtype],
        pack_layout=setup.pack_layout,
        workers=setup.loader,
        **geometry,
    )
    eval_loader = build_eval_loader(
        data.eval, cfg.batch, micro_batch=cfg.train.per_device_eval_batch_size, **geometry
    )
    return train_loader, eval_loader


def build_step_plan(cfg: Config, train_loader) -> StepPlan:
    """The run's optimizer steps, from the loader's micro-batches (packs under --packing)."""
    plan = StepPlan(
        micro_batches_per_epoch=len(train_loader.sampler),
        accumulation=cfg.train.gradient_accumulation_steps,
        epochs=cfg.train.num_train_epochs,
        max_steps=cfg.train.max_steps,
    )
    if plan.total_steps < 1:  # a run that trains nothing must never look like one that did
        raise UserError(
            f"this run would take no optimizer step: {len(train_loader.sampler.lengths)} "
            "training rows. Check --data_path and --data_split (the first weight is SFT's share)."
        )
    return plan


def recorded_settings(cfg: Config, data: SFTData, setup: RunSetup) -> dict:
    """What decides this run's data, order and schedule (checkpoints record it)."""
    return run_settings(cfg, data.cache_key, world_size=setup.world_size)


def load_model(cfg: Config, setup: RunSetup, on_meta: bool = False):
    """The model to train, with the attention start-up resolved and LoRA if asked; `on_meta`:
    its architecture only, no weights read (a dry run, or vetting a checkpoint's model)."""
    model = build_model(
        cfg.model,
        setup.model_config,
        setup.tokenizer,
        setup.engine.config,
        on_meta=on_meta,
        attention=setup.attention,
    )
    return apply_lora(model, cfg.lora)


def build_engine(cfg: Config, model, setup: EngineSetup, plan: StepPlan, dist: DistInfo):
    """The DeepSpeed engine around the model, its optimizer and LR schedule."""
    groups = build_param_groups(model, cfg.train, cfg.lora)
    optimizer = build_optimizer(groups, cfg.train, setup, dist.device.type)
    scheduler = build_scheduler(optimizer, cfg.train, plan.total_steps)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=setup.config
    )
    if cfg.model.compile:  # torch.compile, through DeepSpeed so its hooks stay in place
        engine.compile()
    return engine


def build_loop(
    cfg: Config,
    setup: RunSetup,
    model,
    train_loader: DataLoader,
    eval_loader: DataLoader,
    plan: StepPlan,
    checkpointer: Checkpointer,
    dist: DistInfo,
) -> TrainLoop:
    """The engine around the model, resumed where the checkpointer says (it vets the model
    and picks the engine's loading first), with its data and the monitor, meter and
    checkpointer that watch the loop."""
    ds_config = checkpointer.engine_config(model, setup.engine.config, setup.engine.zero_stage)
    engine = build_engine(cfg, model, replace(setup.engine, config=ds_config), plan, dist)
    checkpointer.resume(engine)
    return TrainLoop(
        engine=engine,
        train_loader=train_loader,
        eval_loader=eval_loader,
        dist=dist,
        plan=plan,
        monitor=build_monitor(
            cfg.train.output_dir, cfg.observe, plan.total_steps, engine.global_steps
        ),
        meter=build_meter(engine, cfg.model.gradient_checkpointing, cfg.observe.peak_tflops, dist),
        checkpointer=checkpointer,
        loss=setup.loss,
    )


def prepare_output_dir(output_dir: str, dist: DistInfo) -> None:
    """Complete the save of an earlier run killed while publishing its model, and delete
    the unpublished folders of killed saves, before this run writes anything there."""
    with rank_zero_first(f"recover {output_dir}"):
        if dist.is_main and (note := recover_interrupted_save(output_dir)):
            print_rank_0(note)


def save_model(cfg: Config, setup: RunSetup, loop: TrainLoop) -> None:
    """Write the Hugging Face folder of what the loop trained (and the LoRA adapter if
    asked), then prove it reloads. If the write fails, the loop's checkpointer says where
    the trained state survives.

    With a chat template the folder carries it, and generation stops at its end of turn.
    """
    engine, output_dir = loop.engine, cfg.train.output_dir
    carry_chat_template(engine.module, setup.tokenizer, setup.template)
    save_hf_model(
        engine.module,
        setup.tokenizer,
        output_dir,
        engine.zero_optimization_stage(),
        cfg.lora.save_lora_adapter,
        loop.checkpointer.advice_after_failed_save(engine.global_steps),
        wait_minutes=cfg.checkpoint.disk_full_wait_minutes,
    )
    print_rank_0(f"saved the fine-tuned model to {output_dir}")
    verify_saved_model(engine, output_dir, loop.eval_loader, loop.dist, cfg.model.trust_remote_code)


def dry_run(cfg: Config, data: SFTData, setup: RunSetup, plan: StepPlan) -> int:
    """Print what a run would do as one JSON line (the last line of stdout); train nothing."""
    model = load_model(cfg, setup, on_meta=True)
    total, trainable = count_parameters(model)
    print_run_summary(cfg, data, (total, trainable), setup, plan)
    summary = {
        "train_rows": len(data.train),
        "eval_rows": len(data.eval),
        "train_tokens": data.train_tokens,
        "chat_template": cfg.data.chat_template,
        "loss_on": cfg.batch.loss_on,
        "trained_token_share": round(count_tokens(data, cfg.batch.loss_on)[1], 4),
        "optimizer_steps": plan.total_steps,
        "sources": [
            {
                "name": s.name,
                "train_rows": s.train_rows,
                "eval_rows": s.eval_rows,
                "skipped_rows": s.skipped_rows,
                "skip_reasons": s.skip_reasons,
            }
            for s in data.sources
        ],
        "parameters": total,
        "trainable_parameters": trainable,
        "loss": "chunked" if setup.loss.chunked else "plain",
        "attention": model.config._attn_implementation,
        "deepspeed_config": setup.engine.config,
    }
    print_rank_0(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
