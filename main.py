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
from deepspeed.accelerator import get_accelerator
from transformers import set_seed

from utils.cli.validate import check_config, resolve_dtype
from utils.config import Config, parse_args
from utils.data.build import build_sft_data
from utils.data.common import SFTData
from utils.data.loaders import build_eval_loader, build_train_loader
from utils.distributed import (
    DistInfo,
    init_distributed,
    is_main_process,
    print_rank_0,
    rank_zero_first,
)
from utils.engine.checkpoint import start_run
from utils.engine.ds_config import build_ds_config
from utils.engine.loop import evaluate, log_eval, train
from utils.engine.optim import build_optimizer, build_param_groups, build_scheduler
from utils.engine.preemption import PREEMPTED_EXIT
from utils.errors import UserError
from utils.model.load import build_model, count_parameters, load_tokenizer
from utils.model.lora import apply_lora
from utils.model.save import save_hf_model, save_lora_adapter
from utils.model.verify import verify_saved_model
from utils.observe.failures import explain_failures, quiet_library_noise
from utils.observe.progress import build_monitor
from utils.observe.summary import print_run_summary
from utils.observe.throughput import build_meter
from utils.planner.report import estimate_memory, format_memory_plan


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        quiet_library_noise(is_main_process(), interactive=sys.stdout.isatty())
        dtype = check_flags(cfg)
        if cfg.planner.estimate_memory:  # from the model's config alone: no data, no weights
            print_rank_0(format_memory_plan(estimate_memory(cfg), cfg))
            return 0
        dist = init_distributed(cfg.engine.local_rank)
        set_seed(cfg.train.seed)
        tokenizer = load_tokenizer(cfg.model)
        with rank_zero_first():  # rank 0 tokenises and caches; the others then read the cache
            data = build_sft_data(cfg.data, tokenizer)
        ds_config = build_ds_config(cfg.engine, cfg.train, dist.world_size, dtype)
        if cfg.train.dry_run:
            return dry_run(cfg, tokenizer, data, ds_config, dist.world_size)
        model = apply_lora(build_model(cfg.model, tokenizer, ds_config), cfg.lora)
        print_run_summary(cfg, data, count_parameters(model), ds_config, dist.world_size)
        run = start_run(cfg.checkpoint, cfg.train.output_dir, model, ds_config, dist)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    train_loader, eval_loader = build_loaders(cfg, data, tokenizer, dist, dtype)
    # Packing changes how many rows an epoch trains, so steps come from the loader.
    engine, total_steps = build_engine(cfg, model, ds_config, train_loader.sampler.num_rows, dist)
    run.resume(engine)
    fit(cfg, engine, train_loader, eval_loader, dist, dtype, total_steps, run)
    if run.preempted:
        return PREEMPTED_EXIT
    save_model(cfg, engine, tokenizer, eval_loader, dist)
    return 0


def check_flags(cfg: Config) -> str:
    """Validate every flag (one error listing all problems); return the resolved dtype."""
    accelerator = get_accelerator()
    on_cuda = accelerator.device_name() == "cuda"
    bf16 = accelerator.is_bf16_supported()
    check_config(cfg, on_cuda, bf16)
    return resolve_dtype(cfg.engine.dtype, on_cuda, bf16)


def build_loaders(cfg: Config, data: SFTData, tokenizer, dist: DistInfo, dtype: str):
    """This rank's training micro-batches and its share of the eval rows."""
    train_loader = build_train_loader(
        data.train,
        cfg.batch,
        cfg.train.per_device_train_batch_size,
        cfg.data.max_seq_len,
        tokenizer.pad_token_id,
        cfg.train.seed,
        dist.rank,
        dist.world_size,
        dtype,
    )
    eval_loader = build_eval_loader(
        data.eval,
        cfg.train.per_device_eval_batch_size,
        tokenizer.pad_token_id,
        dist.rank,
        dist.world_size,
        cfg.batch.loss_on,
    )
    return train_loader, eval_loader


def build_engine(cfg: Config, model, ds_config: dict, train_rows: int, dist: DistInfo):
    """The DeepSpeed engine around the model, its optimizer and LR schedule."""
    total_steps = cfg.train.total_steps(train_rows, dist.world_size)
    optimizer = build_optimizer(
        build_param_groups(model, cfg.train, cfg.lora),
        cfg.train,
        on_cuda=dist.device.type == "cuda",
        offload=cfg.engine.offload,
    )
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, total_steps


def fit(
    cfg: Config,
    engine,
    train_loader,
    eval_loader,
    dist: DistInfo,
    dtype: str,
    total_steps: int,
    run,
) -> None:
    """Evaluate the starting point, then train (logging speed and metrics as it goes)."""
    meter = build_meter(
        engine.module,
        cfg.model.gradient_checkpointing,
        dtype,
        cfg.batch.peak_tflops,
        dist.device,
        dist.world_size,
    )
    fp32_loss = cfg.model.compute_fp32_loss
    monitor = build_monitor(cfg.train.output_dir, cfg.engine, total_steps, engine.global_steps)
    initial = evaluate(engine, eval_loader, dist, fp32_loss)
    log_eval(initial, "Epoch 0 (before training)")
    monitor.log_eval(engine.global_steps, 0, initial)
    train(
        engine,
        train_loader,
        eval_loader,
        cfg.train,
        dist,
        total_steps,
        fp32_loss,
        monitor,
        meter,
        run,
        cfg.batch.loss_averaging,
    )
    monitor.close()


def save_model(cfg: Config, engine, tokenizer, eval_loader, dist: DistInfo) -> None:
    """Write the Hugging Face folder (and the LoRA adapter if asked), then prove it reloads."""
    output_dir, zero_stage = cfg.train.output_dir, cfg.engine.zero_stage
    save_hf_model(engine.module, tokenizer, output_dir, zero_stage)
    if cfg.lora.save_lora_adapter:
        save_lora_adapter(engine.module, output_dir, zero_stage)
    print_rank_0(f"saved the fine-tuned model to {output_dir}")
    verify_saved_model(engine, output_dir, eval_loader, dist, cfg.model.trust_remote_code)


def dry_run(cfg: Config, tokenizer, data: SFTData, ds_config: dict, world_size: int) -> int:
    """Print what a run would do as one JSON line (the last line of stdout); train nothing."""
    model = apply_lora(build_model(cfg.model, tokenizer, ds_config, on_meta=True), cfg.lora)
    total, trainable = count_parameters(model)
    print_run_summary(cfg, data, (total, trainable), ds_config, world_size)
    summary = {
        "train_rows": len(data.train),
        "eval_rows": len(data.eval),
        "train_tokens": data.train_tokens,
        "sources": [
            {"name": s.name, "train_rows": s.train_rows, "eval_rows": s.eval_rows}
            for s in data.sources
        ],
        "parameters": total,
        "trainable_parameters": trainable,
        "deepspeed_config": ds_config,
    }
    print_rank_0(json.dumps(summary))
    return 0


if __name__ == "__main__":
    with explain_failures(sys.argv[1:]):
        sys.exit(main())
