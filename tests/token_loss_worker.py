"""One optimizer step of utils.engine.loop.train on fixed rows, under DeepSpeed; rank 0 saves the weights.

Run by tests/model/test_loss.py with `torch.distributed.run` (one or two CPU ranks):
    python tests/token_loss_worker.py OUT MODE ZERO_STAGE MICRO_BATCH ACCUMULATION
The loop uses the loss main.py would choose (the chunked loss, for this OPT) and logs the
step to metrics.jsonl beside OUT.
"""

from __future__ import annotations

import os
import sys

import deepspeed
import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import OPTConfig, OPTForCausalLM

from utils.checkpoint.checkpointer import build_checkpointer
from utils.checkpoint.config import CheckpointConfig
from utils.data.config import BatchConfig
from utils.data.loaders import build_eval_loader, build_train_loader
from utils.distributed import init_distributed
from utils.engine.accumulation import StepPlan
from utils.engine.config import TrainConfig
from utils.engine.ds_config import EngineSetup
from utils.engine.loop import TrainLoop, train
from utils.model.loss import choose_loss_path
from utils.observe.config import ObserveConfig
from utils.observe.progress import build_monitor
from utils.observe.throughput import build_meter

PAD = 1
LENGTHS = [3, 20, 5, 31, 8, 12, 2, 27]  # unequal, so micro-batches hold unequal token counts


def build_rows() -> list[dict]:
    return [
        {"input_ids": [(11 * i + 5 * j) % 120 + 4 for j in range(n)], "loss_spans": [[1, n]]}
        for i, n in enumerate(LENGTHS)
    ]


def build_model() -> OPTForCausalLM:
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=128,
        hidden_size=32,
        word_embed_proj_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=PAD,
    )
    return OPTForCausalLM(config)


def main(out: str, mode: str, zero_stage: int, micro: int, accumulation: int) -> None:
    dist = init_distributed()
    dataset = Dataset.from_list(build_rows())
    geometry = {"pad_token_id": PAD, "rank": dist.rank, "world_size": dist.world_size}
    geometry["on_gpu"] = False
    loader = build_train_loader(
        dataset,
        BatchConfig(loss_on="all"),
        micro_batch=micro,
        max_seq_len=64,
        seed=0,
        mask_dtype=torch.float32,
        **geometry,
    )
    model = build_model()
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * dist.world_size,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed's default 1.0 would rescale the update
    }
    setup = EngineSetup(config=config, dtype_reason="fp32")
    checkpointer = build_checkpointer(CheckpointConfig(), os.path.dirname(out), {}, dist)
    checkpointer.engine_config(model, setup.config, setup.zero_stage)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=config
    )
    plan = StepPlan(
        micro_batches_per_epoch=len(loader.sampler), accumulation=accumulation, epochs=1
    )
    loop = TrainLoop(
        engine=engine,
        train_loader=loader,
        eval_loader=build_eval_loader(
            dataset, BatchConfig(loss_on="all"), micro_batch=8, **geometry
        ),
        dist=dist,
        plan=plan,
        monitor=build_monitor(os.path.dirname(out), ObserveConfig(), plan.total_steps, 0),
        meter=build_meter(engine, False, None, dist),
        checkpointer=checkpointer,
        loss=choose_loss_path(
            model, "auto", zero_stage=zero_stage, device_type="cpu", fp32=True, compiled=False
        ),
    )
    assert loop.loss.chunked, loop.loss
    train(loop, TrainConfig(gradient_accumulation_steps=accumulation, loss_averaging=mode))
    if dist.rank == 0:
        save_file({k: v.clone() for k, v in engine.module.state_dict().items()}, out)


if __name__ == "__main__":
    out, mode, zero_stage, micro, accumulation = sys.argv[1:]
    main(out, mode, int(zero_stage), int(micro), int(accumulation))
