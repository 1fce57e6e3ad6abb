"""A run trains what its flags say, or stops at once saying why (issue 11).

Each test here failed on the code before the fix it covers: short epochs that trained
nothing, a --deepspeed_config whose ZeRO stage the save did not follow, summaries that
disagreed with training, loss sums that overflowed or rounded, and refusals that ended in
tracebacks.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

import main as cli
from tests.conftest import run_args, summary_setup, write_rows
from utils.checkpoint.checkpointer import Checkpointer
from utils.cli.parse import parse_args
from utils.cli.summary import build_summary
from utils.data.common import IGNORE_INDEX, SFTData, SourceStats
from utils.data.config import BatchConfig
from utils.data.loaders import build_train_loader
from utils.engine.accumulation import StepPlan
from utils.errors import UserError
from utils.model.loss import token_nll


def test_an_epoch_shorter_than_one_accumulation_window_still_trains(
    tiny_model_dir, tmp_path, capsys
):
    # 8 rows, micro-batch 4, accumulation 4: two micro-batches, half a window. Before: zero
    # optimizer steps, and the untrained model was saved and passed verification.
    data = write_rows(tmp_path / "data", train=8)
    flags = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4"]
    code = cli.main(run_args(tiny_model_dir, data, tmp_path, *flags, "--print_loss"))
    out = capsys.readouterr().out
    assert code == 0
    assert "= 1 optimizer step" in out and "step 1/1 loss" in out
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    same_shape = [k for k in before.keys() & after.keys() if before[k].shape == after[k].shape]
    assert any(not torch.equal(before[k], after[k]) for k in same_shape)


def test_a_deepspeed_config_stage_is_the_stage_that_trains_and_saves(
    tiny_model_dir, tmp_path, capsys
):
    # --zero_stage 0 on the command line, stage 3 in the file: the file wins everywhere.
    # Before: the model trained at ZeRO-3 but was saved as if at stage 0 (empty shards).
    data = write_rows(tmp_path / "data", train=16)
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    extra = ["--zero_stage", "0", "--deepspeed_config", str(ds_file), "--max_steps", "2"]
    code = cli.main(run_args(tiny_model_dir, data, tmp_path, *extra))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "ZeRO stage 3" in captured.out and "verified" in captured.out
    saved = load_file(tmp_path / "out" / "model.safetensors")
    original = load_file(tiny_model_dir / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in original.items()}


def test_offload_at_zero_stage_0_is_refused(tiny_model_dir, tmp_path, capsys):
    data = write_rows(tmp_path / "data", train=8)
    assert cli.main(run_args(tiny_model_dir, data, tmp_path, "--offload")) == 2
    err = capsys.readouterr().err
    assert "--offload needs ZeRO stage 1 or more" in err and "Add --zero_stage 2" in err


@pytest.mark.parametrize(
    ("file", "expected"),
    [
        ({"fp16": {"enabled": True}}, "fp16 is enabled (from --deepspeed_config"),
        ({"train_micro_batch_size_per_gpu": 3}, "sets train_micro_batch_size_per_gpu 3"),
        ({"train_batch_size": 64}, "sets train_batch_size 64"),
        ({"zero_optimization": {"stage": 5}}, "ZeRO stage 5 (from --deepspeed_config"),
        (
            {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
            "--offload (from --deepspeed_config",
        ),
    ],
)
def test_a_deepspeed_config_goes_through_the_flags_checks(
    tiny_model_dir, tmp_path, capsys, file, expected
):
    data = write_rows(tmp_path / "data", train=8)
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps(file))
    code = cli.main(run_args(tiny_model_dir, data, tmp_path, "--deepspeed_config", str(ds_file)))
    assert code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("source", ["flag", "deepspeed_config"])
def test_fp16_at_zero_stage_0_is_refused_on_a_gpu(tiny_model_dir, tmp_path, monkeypatch, source):
    """DeepSpeed-Chat's own defaults (fp16, ZeRO-0) barely train on DeepSpeed 0.18.3+
    (tests/engine/test_update_size.py shows why): refused on a GPU, however fp16 is asked for."""
    from deepspeed.accelerator import get_accelerator

    from utils.cli.validate import validate
    from utils.distributed import DistInfo
    from utils.errors import ConfigError

    monkeypatch.setattr(get_accelerator(), "device_name", lambda *a: "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    memory = SimpleNamespace(total_memory=80 * 2**30)  # the loss path sizes chunks by it
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: memory)
    data = write_rows(tmp_path / "data", train=8)
    GPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    extra = ["--dtype", "fp16"]
    if source == "deepspeed_config":
        ds_file = tmp_path / "ds.json"
        ds_file.write_text(json.dumps({"fp16": {"enabled": True}}))
        extra = ["--dtype", "fp32", "--deepspeed_config", str(ds_file)]
    with pytest.raises(ConfigError) as refused:
        validate(parse_args(run_args(tiny_model_dir, data, tmp_path, *extra)), GPU)
    assert "with --zero_stage 0 does not train" in str(refused.value)
    assert "Use --zero_stage 1" in str(refused.value)
    stage_1 = parse_args(run_args(tiny_model_dir, data, tmp_path, *extra, "--zero_stage", "1"))
    assert validate(stage_1, GPU).engine.zero_stage == 1


def test_a_user_error_while_resuming_is_one_line_and_exit_2(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    def corrupt(self, engine):
        raise UserError("checkpoint out/checkpoint-4 is corrupt: run_state.json does not parse")

    monkeypatch.setattr(Checkpointer, "resume", corrupt)
    data = write_rows(tmp_path / "data", train=8)
    assert cli.main(run_args(tiny_model_dir, data, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "error: checkpoint out/checkpoint-4 is corrupt" in err and "Traceback" not in err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loss_sums_are_reduced_in_fp32(dtype):
    # 16 x 512 tokens at a loss near log(vocab): an fp16 sum overflows at 65,504 and a
    # bf16 sum rounds every addition. Both must match the fp32 computation.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 512, 4096, generator=generator) * 3
    labels = torch.randint(0, 4096, (16, 512), generator=generator)
    labels[:, :7] = IGNORE_INDEX
    exact, count = token_nll(logits, labels, fp32=True)
    low, low_count = token_nll(logits.to(dtype), labels, fp32=False)
    assert low.dtype == torch.float32 and torch.isfinite(low) and low_count == count
    assert exact.item() > 65_504  # the case that overflowed
    assert low.item() == pytest.approx(exact.item(), rel=2e-3)


def test_summary_reports_what_training_uses(tiny_model_dir):
    # --loss_on response: the loss covers response tokens only (before: "100%").
    cfg = parse_args(["--model_name_or_path", str(tiny_model_dir), "--loss_on", "response"])
    rows = {"input_ids": [[1, 5, 6, 7], [1, 8, 9, 10]], "loss_spans": [[[3, 4]], [[2, 4]]]}
    data = SFTData(Dataset.from_dict(rows), Dataset.from_dict(rows), [SourceStats("d", 2)])
    config = {
        "train_batch_size": 2,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
    }
    plan = StepPlan(micro_batches_per_epoch=1, accumulation=1, epochs=1)
    text = build_summary(cfg, data, (10, 10), summary_setup(config), plan)
    assert "loss on 38% of them (responses only)" in text  # 3 of 8 tokens


def test_packing_steps_count_packs_not_rows():
    # 40 rows of 8 tokens pack 4 to a row of 32: 10 packs, 5 micro-batches of 2 (not 20).
    rows = Dataset.from_dict({"input_ids": [[5] * 8] * 40, "loss_spans": [[[1, 8]]] * 40})
    loader = build_train_loader(
        rows,
        BatchConfig(packing=True, loss_on="all"),
        micro_batch=2,
        max_seq_len=32,
        pad_token_id=0,
        seed=0,
        rank=0,
        world_size=1,
        mask_dtype=torch.float32,
        on_gpu=False,
    )
    plan = cli.build_step_plan(parse_args(["--model_name_or_path", "m"]), loader)
    assert plan.micro_batches_per_epoch == 5 and plan.total_steps == 5
