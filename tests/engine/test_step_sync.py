"""A steady training step does not make the host wait for the device.

On a GPU each wait stalls the host's kernel launches until the device drains; DeepSpeed's
throughput timer waits twice per micro-batch (start and stop) unless the config turns it
off. On this CPU the waits are counted, not felt: the engine is the tool's own (its config
and optimizer), and the accelerator's synchronize is what a GPU would block in.
"""

from __future__ import annotations

import deepspeed
from deepspeed.accelerator import get_accelerator

from tests.token_loss_worker import PAD, build_model, build_rows
from utils.data.collate import collate
from utils.engine.config import EngineConfig, TrainConfig
from utils.engine.ds_config import EngineSetup, build_ds_config
from utils.engine.optim import build_optimizer, build_param_groups
from utils.model.config import LoraConfig
from utils.model.loss import PLAIN_FP32, summed_nll
from utils.observe.config import ObserveConfig


def test_steady_steps_never_synchronize_the_device(one_rank_group, monkeypatch):
    train = TrainConfig(per_device_train_batch_size=8)
    config = build_ds_config(EngineConfig(), train, ObserveConfig(), 1, "fp32", on_cuda=False)
    model = build_model()
    setup = EngineSetup(config, dtype_reason="fp32")
    optimizer = build_optimizer(build_param_groups(model, train, LoraConfig()), train, setup, "cpu")
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    batch = collate(build_rows(), pad_token_id=PAD, loss_on="all")
    waits = []
    monkeypatch.setattr(get_accelerator(), "synchronize", lambda *a, **k: waits.append(1))
    for _ in range(4):  # DeepSpeed's timer starts waiting from the third step
        engine.backward(summed_nll(engine, batch, PLAIN_FP32))
        engine.step()
    assert engine.global_steps == 4 and not waits
