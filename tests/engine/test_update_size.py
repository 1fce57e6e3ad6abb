"""Each optimizer step through a real DeepSpeed engine moves the weights by its own gradient.

For every precision and ZeRO stage the tool accepts, two SGD steps (lr 1, no weight decay)
on the tool's token-weighted loss, with the tool's DeepSpeed config (gradient clipping 1.0
included), must each change the weights by minus the clipped gradient the same loss has
at the same weights without DeepSpeed. The second step's loss is scaled so that its
gradient stays under the clipping norm: a gradient left over from the first step (as
DeepSpeed 0.17.6-0.18.5 leave them in bf16 at ZeRO-0 with the CPU Adam) changes its size.

DeepSpeed 0.18.3+ moves the weights by 1/65536 of the gradient at ZeRO-0 fp16, which is
why the tool refuses that combination (utils/engine/precision_rules.py has the details). fp16 runs on this
CPU by telling DeepSpeed the CPU supports it, which runs the loss-scaling code a GPU runs.
Plain SGD gets the stage-0 wrapper of the tool's CPU Adam (FP16_UnfusedOptimizer); on a
GPU the tool's FusedAdam gets FP16_Optimizer, which scales the same way.
"""

from __future__ import annotations

import deepspeed
import pytest
import torch
from deepspeed.accelerator import get_accelerator

from tests.token_loss_worker import PAD, build_model, build_rows
from utils.data.collate import collate
from utils.engine.config import EngineConfig, TrainConfig
from utils.engine.ds_config import build_ds_config
from utils.engine.precision_rules import precision_problems
from utils.model.loss import token_nll
from utils.observe.config import ObserveConfig

ROWS = build_rows()
BATCH = collate(ROWS, pad_token_id=PAD, loss_on="all")
# Loose enough for a 16-bit forward pass, tight enough to catch any wrong scale factor.
TOLERANCE = {"fp32": 1e-4, "bf16": 0.01, "fp16": 0.01}  # measured: 1e-6, 2e-4, 5e-5


def step_loss(model) -> torch.Tensor:
    """The tool's loss: summed token NLL (in fp32) over the step's trained tokens."""
    inputs = {k: BATCH[k] for k in ("input_ids", "attention_mask")}
    nll, tokens = token_nll(model(**inputs).logits, BATCH["labels"], fp32=True)
    return nll / tokens


def reference_gradient(start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loss's gradient at the weights `start`, computed without DeepSpeed."""
    model = build_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(start[name])
    step_loss(model).backward()
    return {name: p.grad.double() for name, p in model.named_parameters()}


def norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t**2).sum() for t in tensors.values())))


def ratio_along(moved: dict, start: dict, expected: dict) -> float:
    """The weight change's size along the expected update: 1 when they agree."""
    along = sum(((moved[n] - start[n]) * e).sum() for n, e in expected.items())
    return float(along / sum((e**2).sum() for e in expected.values()))


def weights(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3):
        return {n: p.detach().double().clone() for n, p in engine.module.named_parameters()}


def step_twice(dtype: str, zero_stage: int, on_cuda: bool) -> list[float]:
    """Two engine steps; each one's weight change along its expected update (1 = exact).

    `on_cuda` as validation passes it: bf16 at ZeRO-0 on a CPU runs through torch.autocast."""
    config = build_ds_config(
        EngineConfig(zero_stage=zero_stage),
        TrainConfig(per_device_train_batch_size=len(ROWS), gradient_accumulation_steps=1),
        ObserveConfig(),
        world_size=1,
        dtype=dtype,
        on_cuda=on_cuda,
    )
    config["zero_allow_untested_optimizer"] = True  # plain SGD: the update is the gradient
    model = build_model()
    sgd = torch.optim.SGD(model.parameters(), lr=1.0, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=sgd, config=config)
    ratios = []
    for step in range(2):
        start = weights(engine, zero_stage)  # in 16-bit runs, the 16-bit weights
        gradient = reference_gradient(start)
        # Step 1: the loss itself, its gradient clipped to norm 1 (the config's clipping).
        # Step 2: the loss scaled to a gradient of norm 0.5, under the clipping norm, so a
        # gradient left over from step 1 would show (and be clipped with it).
        scale = 1.0 if step == 0 else 0.5 / norm(gradient)
        factor = min(1.0, 1.0 / norm(gradient)) if step == 0 else scale
        engine.backward(scale * step_loss(engine))
        engine.step()
        expected = {name: -factor * g for name, g in gradient.items()}
        ratios.append(ratio_along(weights(engine, zero_stage), start, expected))
    return ratios


@pytest.fixture
def device_for(monkeypatch):
    """fp16 runs as on a GPU: DeepSpeed refuses fp16 on its CPU accelerator, so claim
    support, which runs the same optimizer and loss-scaling code as on CUDA."""

    def on_cuda(dtype: str) -> bool:
        if dtype == "fp16":
            monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)
        return dtype == "fp16"

    return on_cuda


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_every_accepted_precision_and_stage_moves_the_weights_by_the_gradient(
    one_rank_group, device_for, dtype, zero_stage
):
    on_cuda = device_for(dtype)
    if problems := precision_problems(dtype, zero_stage, on_cuda, bf16_supported=True):
        # Refused before any work, with the fix: fp16 at stage 0 (and bf16 there with the
        # CPU Adam on DeepSpeed 0.17.6-0.18.5), which these steps would show to be wrong.
        assert "Use --zero_stage 1" in problems[0]
        return
    first, second = step_twice(dtype, zero_stage, on_cuda)
    assert first == pytest.approx(1.0, abs=TOLERANCE[dtype])
    assert second == pytest.approx(1.0, abs=TOLERANCE[dtype])  # no gradient left over
