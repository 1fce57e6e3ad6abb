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

import deepspeed
from transformers import set_seed

from utils.cli.failures import explain_failures, quiet_library_noise
from utils.cli.parse import parse_args
from utils.cli.summary import count_tokens, print_run_summary
from utils.cli.validate import validate
from utils.config import Config
from utils.data.build import build_sft_data
from utils.data.chat import ChatTemplate, load_chat_template
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
from utils.engine.checkpoint import build_checkpointer
from utils.engine.ds_config import EngineSetup
from utils.engine.loop import TrainLoop, train
from utils.engine.optim import build_optimizer, build_param_groups, build_scheduler
from utils.engine.precision import TORCH_DTYPES
from utils.engine.preemption import PREEMPTED_EXIT
from utils.engine.run_settings import run_settings
from utils.errors import UserError
from utils.model.attention import uses_flat_packs
from utils.model.load import build_model, count_parameters, load_tokenizer
from utils.model.lora import apply_lora
from utils.model.loss import LossPath, choose_loss_path
from utils.model.publish import recover_interrupted_save
from utils.model.save import check_disk_space, save_hf_model
from utils.model.serving import carry_chat_template
from utils.model.verify import verify_saved_model
from utils.observe.progress import build_monitor
from utils.observe.throughput import build_meter
from utils.planner.report import memory_plan_report


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        quiet_library_noise(is_main_process(), interactive=sys.stdout.isatty())
        setup = validate(cfg)
        if cfg.planner.estimate_memory:  # from the model's config alone: no data, no weights
            print_rank_0(memory_plan_report(cfg, setup))
            return 0
        dist = init_distributed(cfg.engine.local_rank, cfg.engine.dist_timeout_minutes)
        set_seed(cfg.data.seed)
        tokenizer = load_tokenizer(cfg.model, cfg.data.added_token)
        template = load_chat_template(cfg.data.chat_template, tokenizer)  # None: dschat
        with rank_zero_first("build the data cache"):  # the others then read the cache
            data = build_sft_data(cfg.data, tokenizer)
        check_trained_tokens(data, cfg.batch.loss_on, cfg.data.max_seq_len)
        train_loader, eval_loader = build_loaders(cfg, data, tokenizer, dist, setup)
        plan = build_step_plan(cfg, train_loader)
        if cfg.train.dry_run:
            return dry_run(cfg, tokenizer, data, setup, plan, dist)
        prepare_output_dir(cfg.train.output_dir, dist)
        # Before the model loads: a checkpoint this run cannot continue is refused cheaply.
        checkpointer = build_checkpointer(
            cfg.checkpoint, cfg.train.output_dir, recorded_settings(cfg, data, dist), dist
        )
        model = build_model(cfg.model, tokenizer, setup.config, attention=setup.attention)
        model = apply_lora(model, cfg.lora)
        check_disk_space(model, cfg.train.output_dir, "Nothing has been trained yet.")
        loss = choose_loss(cfg, model, setup, dist)
        print_run_summary(cfg, data, count_parameters(model), setup, plan, loss)
        engine = build_engine(cfg, model, checkpointer.engine_setup(model, setup), plan, dist)
        checkpointer.resume(engine)
        loop = build_loop(cfg, engine, train_loader, eval_loader, dist, plan, checkpointer, loss)
        train(loop, cfg.train)
        if checkpointer.preempted:
            return PREEMPTED_EXIT
        save_model(cfg, engine, tokenizer, template, eval_loader, dist, checkpointer)
        return 0
    except UserError as err:  # a mistake the user can fix: one message, no traceback
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


def build_loaders(cfg: Config, data: SFTData, tokenizer, dist: DistInfo, setup: EngineSetup):
    """This rank's training micro-batches and its share of the eval rows."""
    geometry = {"pad_token_id": tokenizer.pad_token_id, "rank": dist.rank}
    geometry |= {"world_size": dist.world_size, "on_gpu": dist.device.type == "cuda"}
    train_loader = build_train_loader(
        data.train,
        cfg.batch,
        micro_batch=setup.config["train_micro_batch_size_per_gpu"],
        max_seq_len=cfg.data.max_seq_len,
        seed=cfg.data.seed,
        mask_dtype=TORCH_DTYPES[setup.dtype],
        flat_packs=uses_flat_packs(cfg.batch.packing, setup.attention),
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


def choose_loss(cfg: Config, model, setup: EngineSetup, dist: DistInfo) -> LossPath:
    """Chunked or plain loss, once for the whole run (the summary says which and why)."""
    return choose_loss_path(
        model,
        cfg.model.chunked_loss,
        zero_stage=setup.zero_stage,
        device_type=dist.device.type,
        fp32=cfg.model.compute_fp32_loss,
        compiled=cfg.model.compile,
    )


def recorded_settings(cfg: Config, data: SFTData, dist: DistInfo) -> dict:
    """What decides this run's data, order and schedule (checkpoints record it)."""
    return run_settings(
        cfg.data, cfg.batch, cfg.train, cfg.lora, data.cache_key, world_size=dist.world_size
    )


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
    engine,
    train_loader,
    eval_loader,
    dist: DistInfo,
    plan: StepPlan,
    checkpointer,
    loss: LossPath,
) -> TrainLoop:
    """The engine, its data, and the monitor, meter and checkpointer that watch the loop."""
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
        loss=loss,
    )


def prepare_output_dir(output_dir: str, dist: DistInfo) -> None:
    """Complete the save of an earlier run killed while publishing its model, and delete
    the unpublished folders of killed saves, before this run writes anything there."""
    with rank_zero_first(f"recover {output_dir}"):
        if dist.is_main and (note := recover_interrupted_save(output_dir)):
            print_rank_0(note)


def save_model(
    cfg: Config,
    engine,
    tokenizer,
    template: ChatTemplate | None,
    eval_loader,
    dist: DistInfo,
    checkpointer,
) -> None:
    """Write the Hugging Face folder (and the LoRA adapter if asked), then prove it reloads.

    With a chat template the folder carries it, and generation stops at its end of turn.
    """
    output_dir, zero_stage = cfg.train.output_dir, engine.zero_optimization_stage()
    carry_chat_template(engine.module, tokenizer, template)
    advice = checkpointer.advice_after_failed_save(engine.global_steps)
    save_hf_model(
        engine.module, tokenizer, output_dir, zero_stage, cfg.lora.save_lora_adapter, advice
    )
    print_rank_0(f"saved the fine-tuned model to {output_dir}")
    verify_saved_model(engine, output_dir, eval_loader, dist, cfg.model.trust_remote_code)


def dry_run(
    cfg: Config, tokenizer, data: SFTData, setup: EngineSetup, plan: StepPlan, dist: DistInfo
) -> int:
    """Print what a run would do as one JSON line (the last line of stdout); train nothing."""
    model = build_model(cfg.model, tokenizer, setup.config, on_meta=True, attention=setup.attention)
    model = apply_lora(model, cfg.lora)
    total, trainable = count_parameters(model)
    loss = choose_loss(cfg, model, setup, dist)
    print_run_summary(cfg, data, (total, trainable), setup, plan, loss)
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
        "loss": "chunked" if loss.chunked else "plain",
        "attention": model.config._attn_implementation,
        "deepspeed_config": setup.config,
    }
    print_rank_0(json.dumps(summary))
    return 0


if __name__ == "__main__":
    with explain_failures(lambda: parse_args(sys.argv[1:])):
        sys.exit(main())
