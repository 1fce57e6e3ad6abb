"""Out-of-memory advice follows the run's effective settings, not only its flags (issue 20).

Before: the advice read the raw --zero_stage and --offload, so a run whose ZeRO stage 3 came
from --deepspeed_config was told to try --zero_stage 3, which it already had.
"""

from __future__ import annotations

import json

import pytest
import torch

import main as cli
from tests.conftest import run_args, write_rows
from utils.cli.failures import OOM_EXIT_CODE


def test_a_zero_3_run_from_its_deepspeed_config_is_not_told_to_try_zero_3(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    data = write_rows(tmp_path / "data", train=8)

    def out_of_memory(*args, **kwargs):  # the first step after start-up runs out of memory
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cli, "build_sft_data", out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(run_args(tiny_model_dir, data, tmp_path, "--deepspeed_config", str(ds_file)))
    assert exit_info.value.code == OOM_EXIT_CODE
    err = capsys.readouterr().err
    assert "out of memory" in err and "--gradient_checkpointing" in err
    assert "--zero_stage 3" not in err
