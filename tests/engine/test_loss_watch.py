"""A NaN or inf training loss stops the run with the step named, before anything is saved.

Without a loss scale (fp32, bf16) DeepSpeed applies a step whose gradients are NaN, or, with
bf16's overflow check, skips it silently; either way the run would go on training nothing.
The tool's own config, optimizer and loop run on a tiny OPT whose forward pass turns NaN at
step 3; checkpoints are due every 5 steps, logging every 10.
"""

from __future__ import annotations

import deepspeed
import pytest
import torch
from datasets import Dataset

from tests.token_loss_worker import PAD, build_model, build_rows
from utils.checkpoint.checkpointer import build_checkpointer
from utils.checkpoint.config import CheckpointConfig
from utils.data.config import BatchConfig
from utils.data.loaders import build_eval_loader, build_train_loader
from utils.engine.accumulation import StepPlan
from utils.engine.config import EngineConfig, TrainConfig
from utils.engine.ds_config import EngineSetup, build_ds_config
from utils.engine.loop import TrainLoop, train
from utils.engine.loss_watch import NonFiniteLoss
from utils.engine.optim import build_optimizer, build_param_groups
from utils.model.config import LoraConfig
from utils.model.loss import choose_loss_path
from utils.observe.config import ObserveConfig
from utils.observe.progress import build_monitor
from utils.observe.throughput import build_meter

BAD_STEP = 3


@pytest.mark.parametrize(("dtype", "zero_stage"), [("fp32", 0), ("bf16", 2)])
def test_a_nan_loss_stops_the_run_naming_its_step(one_rank_group, tmp_path, dtype, zero_stage):
    dist = one_rank_group
    rows = Dataset.from_list(build_rows())
    geometry = {"pad_token_id": PAD, "rank": 0, "world_size": 1, "on_gpu": False}
    train_loader = build_train_loader(
        rows, BatchConfig(loss_on="all"), micro_batch=1, max_seq_len=64, seed=0,
        mask_dtype=torch.float32, **geometry,
    )  # fmt: skip
    eval_loader = build_eval_loader(rows, BatchConfig(loss_on="all"), micro_batch=8, **geometry)
    train_cfg = TrainConfig(per_device_train_batch_size=1, num_train_epochs=2)
    config = build_ds_config(
        EngineConfig(zero_stage=zero_stage), train_cfg, ObserveConfig(), 1, dtype, on_cuda=False
    )
    model = build_model()
    setup = EngineSetup(config, dtype_reason=dtype)
    groups = build_param_groups(model, train_cfg, LoraConfig())
    optimizer = build_optimizer(groups, train_cfg, setup, "cpu")
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def poison(module, inputs, output):  # the forward pass of step BAD_STEP overflows
        return output * float("nan") if engine.global_steps == BAD_STEP - 1 else output

    model.model.decoder.final_layer_norm.register_forward_hook(poison)
    plan = StepPlan(len(train_loader.sampler), accumulation=1, epochs=2)
    checkpointer = build_checkpointer(CheckpointConfig(save_steps=5), str(tmp_path), {}, dist)
    checkpointer.engine_config(model, setup.config, setup.zero_stage)
    loop = TrainLoop(
        engine=engine, train_loader=train_loader, eval_loader=eval_loader, dist=dist, plan=plan,
        monitor=build_monitor(str(tmp_path), ObserveConfig(), plan.total_steps, 0),
        meter=build_meter(engine, False, None, dist), checkpointer=checkpointer,
        loss=choose_loss_path(model, "auto", zero_stage=zero_stage, device_type="cpu",
                              fp32=False, compiled=False),
    )  # fmt: skip
    with pytest.raises(NonFiniteLoss, match=f"NaN or inf at optimizer step {BAD_STEP},"):
        train(loop, train_cfg)
    assert engine.global_steps == 5  # noticed before step 5's checkpoint, not at step 10's log
    assert not list(tmp_path.glob("*checkpoint-*"))
