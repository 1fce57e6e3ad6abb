"""On a GPU the tool trains with torch's fused AdamW (utils/engine/optim.py): it must take the
steps DeepSpeed's Adam would, and DeepSpeed's ZeRO and 16-bit wrappers must step it right.

FusedAdam needs CUDA; DeepSpeed's CPU Adam runs the same algorithm (AdamW mode) on a CPU, and
torch's fused AdamW runs on a CPU too, so both checks run here with the GPU's choice forced.
"""

from __future__ import annotations

import deepspeed
import pytest
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.ops.adam import DeepSpeedCPUAdam

from tests.token_loss_worker import PAD, build_model, build_rows
from utils.data.collate import collate
from utils.engine.config import EngineConfig, TrainConfig
from utils.engine.ds_config import EngineSetup, build_ds_config
from utils.engine.optim import ADAM_BETAS, build_optimizer, build_param_groups, optimizer_kind
from utils.engine.precision_rules import precision_problems
from utils.model.config import LoraConfig
from utils.model.loss import token_nll
from utils.observe.config import ObserveConfig

TRAIN = TrainConfig(per_device_train_batch_size=8, learning_rate=1e-2, weight_decay=0.1)
BATCH = collate(build_rows(), pad_token_id=PAD, loss_on="all")
# fp32 differs by rounding only; 16-bit forward passes flip the sign of a few tiny gradients.
TOLERANCE = {"fp32": 1e-4, "bf16": 0.03, "fp16": 0.03}


def test_torch_fused_adamw_takes_deepspeeds_adam_steps():
    """Five steps on the tool's parameter groups (decay and no decay), with its betas."""
    torch_model, ds_model = build_model(), build_model()
    torch_adam = torch.optim.AdamW(
        build_param_groups(torch_model, TRAIN, LoraConfig()),
        lr=TRAIN.learning_rate,
        betas=ADAM_BETAS,
        fused=True,
    )
    groups = build_param_groups(ds_model, TRAIN, LoraConfig())
    ds_adam = DeepSpeedCPUAdam(groups, lr=TRAIN.learning_rate, betas=ADAM_BETAS, adamw_mode=True)
    assert {g["weight_decay"] for g in groups} == {0.0, 0.1}
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        for a, b in zip(torch_model.parameters(), ds_model.parameters(), strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        torch_adam.step()
        ds_adam.step()
    start = build_model()
    models = (torch_model.parameters(), ds_model.parameters(), start.parameters())
    for a, b, s in zip(*models, strict=True):
        moved = (a - s).detach()
        assert moved.abs().max() > 0.01  # five steps of lr 1e-2 really moved them
        torch.testing.assert_close(b.detach() - s.detach(), moved, rtol=1e-4, atol=1e-6)


def step_loss(model) -> torch.Tensor:
    nll, tokens = token_nll(model(**{k: BATCH[k] for k in ("input_ids", "attention_mask")}).logits,
                            BATCH["labels"], fp32=True)  # fmt: skip
    return nll / tokens


def params(engine, zero_stage: int) -> list[torch.Tensor]:
    model_params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(model_params, enabled=zero_stage == 3):
        return [p.detach().float().clone() for p in model_params]


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_deepspeed_steps_the_gpu_optimizer_as_torch_alone_does(
    one_rank_group, monkeypatch, dtype, zero_stage
):
    """Two steps through the engine (the tool's config, clipping included) move the weights
    as two steps of torch's AdamW with clipping do from the same weights, without DeepSpeed."""
    if dtype == "fp16":  # DeepSpeed's CPU accelerator refuses fp16; its GPU code runs anyway
        monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)
    config = build_ds_config(
        EngineConfig(zero_stage=zero_stage), TRAIN, ObserveConfig(), 1, dtype, on_cuda=True
    )
    setup = EngineSetup(config, dtype_reason=dtype)
    if (
        precision_problems(dtype, zero_stage, True, True)
        or optimizer_kind(setup, "cuda") != "torch"
    ):
        return  # refused (fp16 at ZeRO-0), or FusedAdam (16 bits at ZeRO-0): needs CUDA
    model = build_model()
    optimizer = build_optimizer(
        build_param_groups(model, TRAIN, LoraConfig()), TRAIN, setup, "cuda"
    )
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    start = params(engine, zero_stage)  # in 16-bit runs, the 16-bit weights
    reference = build_model()
    with torch.no_grad():
        for p, s in zip(reference.parameters(), start, strict=True):
            p.copy_(s)
    torch_adam = torch.optim.AdamW(
        build_param_groups(reference, TRAIN, LoraConfig()), lr=TRAIN.learning_rate,
        betas=ADAM_BETAS, fused=True,
    )  # fmt: skip
    for _ in range(2):
        engine.backward(step_loss(engine))
        engine.step()
        step_loss(reference).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        torch_adam.step()
        torch_adam.zero_grad()
    moved = [p - s for p, s in zip(params(engine, zero_stage), start, strict=True)]
    expected = [p.detach() - s for p, s in zip(reference.parameters(), start, strict=True)]
    along = sum((m * e).sum() for m, e in zip(moved, expected, strict=True))
    ratio = float(along / sum((e**2).sum() for e in expected))
    assert ratio == pytest.approx(1.0, abs=TOLERANCE[dtype])
