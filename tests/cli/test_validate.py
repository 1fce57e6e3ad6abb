"""What start-up resolves is decided once, from everything at hand, before expensive work
(issue 20): the loss path before the model loads, a LoRA scope before the data is built,
and every problem of the flags and the merged DeepSpeed config in one report."""

from __future__ import annotations

import json

import pytest
import torch

import main as cli
from tests.conftest import run_args, write_rows
from utils.cli.parse import parse_args
from utils.cli.validate import validate
from utils.distributed import DistInfo
from utils.errors import ConfigError
from utils.model.load import build_model
from utils.model.lora import apply_lora
from utils.model.loss import choose_loss_path

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_the_loss_decided_before_the_model_loads_is_the_built_models(tiny_model_dir):
    cfg = parse_args(["--model_name_or_path", str(tiny_model_dir), "--dry_run", "--lora_dim", "4"])
    setup = validate(cfg, CPU)
    model = build_model(cfg.model, setup.model_config, setup.tokenizer, on_meta=True)
    model = apply_lora(model, cfg.lora)
    built = choose_loss_path(
        model, "auto", zero_stage=setup.engine.zero_stage, device_type="cpu", fp32=False,
        compiled=False,
    )  # fmt: skip
    assert setup.loss.chunked and setup.loss == built


def test_lora_on_the_output_layer_means_the_plain_loss(tiny_model_dir):
    flags = ["--model_name_or_path", str(tiny_model_dir), "--dry_run", "--lora_dim", "4"]
    flags += ["--lora_module_name", "lm_head"]
    loss = validate(parse_args(flags), CPU).loss
    assert not loss.chunked and "'lm_head' puts LoRA on the output layer" in loss.reason
    with pytest.raises(ConfigError, match="--chunked_loss on cannot be used with this model"):
        validate(parse_args([*flags, "--chunked_loss", "on"]), CPU)


def test_a_lora_scope_that_matches_nothing_is_refused_before_the_data_is_built(
    tiny_model_dir, tmp_path, capsys
):
    data = write_rows(tmp_path / "data", train=8)
    flags = ["--lora_dim", "4", "--lora_module_name", "no.such.layer"]
    assert cli.main(run_args(tiny_model_dir, data, tmp_path, *flags)) == 2
    assert "--lora_module_name 'no.such.layer' matches no linear layer" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # before: found after the data was built


def test_a_bad_flag_hides_no_problem_of_the_deepspeed_config(tiny_model_dir, tmp_path):
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"fp16": {"enabled": True}}))
    data = write_rows(tmp_path / "data", train=8)
    flags = ["--only_optimize_lora", "--deepspeed_config", str(ds_file)]
    with pytest.raises(ConfigError) as refused:
        validate(parse_args(run_args(tiny_model_dir, data, tmp_path, *flags)), CPU)
    assert "--only_optimize_lora needs LoRA" in str(refused.value)
    assert "fp16 is enabled (from --deepspeed_config" in str(refused.value)  # before: hidden
