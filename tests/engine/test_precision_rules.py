"""Which precision and ZeRO stage combinations the tool accepts, and what it says otherwise."""

from __future__ import annotations

import pytest

from utils.engine.precision_rules import precision_problems


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_fp16_on_a_gpu_is_accepted_from_zero_stage_1(zero_stage):
    assert precision_problems("fp16", zero_stage, on_cuda=True, bf16_supported=False) == []


def test_fp16_at_zero_stage_0_is_refused_with_the_fix():
    (problem,) = precision_problems("fp16", 0, on_cuda=True, bf16_supported=True)
    assert problem.startswith("--dtype fp16 with --zero_stage 0")
    assert "loss scale" in problem  # why
    assert "Use --zero_stage 1" in problem and "--dtype bf16" in problem  # the fixes
    # A GPU without bf16 (V100, T4) is not told to use bf16.
    (problem,) = precision_problems("fp16", 0, on_cuda=True, bf16_supported=False)
    assert "Use --zero_stage 1" in problem and "bf16" not in problem


def test_auto_picking_fp16_says_so():
    (problem,) = precision_problems("fp16", 0, True, bf16_supported=False, requested="auto")
    assert problem.startswith("--dtype auto (which picks fp16 here) with --zero_stage 0")


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fp32_and_bf16_are_accepted_at_every_stage(dtype, zero_stage):
    assert precision_problems(dtype, zero_stage, on_cuda=True, bf16_supported=True) == []
    assert precision_problems(dtype, zero_stage, on_cuda=False, bf16_supported=True) == []


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_fp16_on_a_cpu_is_refused(zero_stage):
    (problem,) = precision_problems("fp16", zero_stage, on_cuda=False, bf16_supported=True)
    assert problem.startswith("--dtype fp16 needs a GPU") and "use bf16 or fp32" in problem


def test_bf16_on_a_gpu_without_it_points_at_fp16_from_stage_1():
    (problem,) = precision_problems("bf16", 2, on_cuda=True, bf16_supported=False)
    assert problem.startswith("--dtype bf16 is not supported by this GPU")
    assert "--dtype fp16 with --zero_stage 1, 2 or 3" in problem


@pytest.mark.parametrize(
    "deepspeed_version", ["0.17.6", "0.18.0", "0.18.2", "0.18.3", "0.18.5+g1234abc"]
)
def test_bf16_at_stage_0_on_the_cpu_adam_is_refused_where_deepspeed_breaks_it(deepspeed_version):
    for on_cuda in (False, True):
        (problem,) = precision_problems(
            "bf16", 0, on_cuda, True, offload=True, deepspeed_version=deepspeed_version
        )
        assert problem.startswith("--dtype bf16 with --zero_stage 0")
        assert "Use --zero_stage 1, or DeepSpeed 0.18.6 or later" in problem
    # A CPU without --offload trains bf16 at stage 0 through torch.autocast: no wrapper.
    assert precision_problems("bf16", 0, False, True, deepspeed_version=deepspeed_version) == []
    # FusedAdam's stage-0 wrapper (on a GPU without offload) trains bf16 correctly there.
    assert precision_problems("bf16", 0, True, True, deepspeed_version=deepspeed_version) == []
    assert precision_problems("bf16", 1, False, True, deepspeed_version=deepspeed_version) == []


@pytest.mark.parametrize("deepspeed_version", ["0.16.9", "0.17.5", "0.18.6", "0.19.8"])
def test_bf16_at_stage_0_on_a_cpu_is_accepted_elsewhere(deepspeed_version):
    assert precision_problems("bf16", 0, False, True, deepspeed_version=deepspeed_version) == []
