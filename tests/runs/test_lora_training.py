"""LoRA through the real pipeline: DeepSpeed engine steps, saving at ZeRO-3 on two ranks, planner CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.conftest import REPO, child_env
from utils.cli.parse import parse_args
from utils.model.lora import is_lora_parameter


def _launch_env() -> dict[str, str]:
    return child_env(PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")


def _write_jsonl_data(folder, n: int = 24) -> str:
    """A local data folder in the prompt/chosen format the data layer reads."""
    os.makedirs(folder, exist_ok=True)
    rows = [
        {
            "prompt": f" Human: What is {i} plus {i}?",
            "chosen": f" Assistant: {i} plus {i} is {2 * i}.",
        }
        for i in range(n)
    ]
    for name, part in (("train.jsonl", rows[4:]), ("eval.jsonl", rows[:4])):
        with open(os.path.join(folder, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    return str(folder)


def test_only_lora_with_checkpointing_trains_adapters_and_keeps_base_bit_identical(
    one_rank_group, tiny_model_dir, tiny_tokenizer
):
    from main import build_engine
    from utils.engine.accumulation import StepPlan
    from utils.engine.ds_config import EngineSetup, build_ds_config
    from utils.model.load import build_model, load_model_config
    from utils.model.lora import apply_lora

    cfg = parse_args(["--model_name_or_path", str(tiny_model_dir), "--lora_dim", "4",
                      "--only_optimize_lora", "--gradient_checkpointing", "--lora_learning_rate",
                      "2e-2", "--per_device_train_batch_size", "4", "--max_steps", "6",
                      "--lr_scheduler_type", "constant"])  # fmt: skip
    config = build_ds_config(cfg.engine, cfg.train, cfg.observe, 1, "fp32", on_cuda=False)
    setup = EngineSetup(config=config, dtype_reason="--dtype fp32")
    model_config = load_model_config(cfg.model)
    model = apply_lora(build_model(cfg.model, model_config, tiny_tokenizer, setup.config), cfg.lora)
    base_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if not is_lora_parameter(n)
    }
    engine = build_engine(cfg, model, setup, StepPlan(24, 1, 1, max_steps=6), one_rank_group)
    ids = torch.randint(4, len(tiny_tokenizer), (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(6):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    after = dict(engine.module.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base_before.items())
    lora_b = [p for n, p in after.items() if ".lora_B." in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: every adapter trained


@pytest.mark.slow
def test_zero3_two_ranks_save_merged_model_equal_to_the_lora_model(tmp_path, tiny_model_dir):
    if shutil.which("deepspeed") is None:
        pytest.skip("the deepspeed launcher is not on PATH")
    data = _write_jsonl_data(tmp_path / "data")
    out = tmp_path / "out"
    cmd = ["deepspeed", "--num_gpus", "2", "main.py", "--model_name_or_path", str(tiny_model_dir),
           "--data_path", data, "--data_split", "10,0,0", "--data_output_path",
           str(tmp_path / "cache"), "--max_seq_len", "32",
           "--per_device_train_batch_size", "4", "--zero_stage", "3", "--lora_dim", "4",
           "--only_optimize_lora", "--gradient_checkpointing", "--lora_learning_rate", "2e-2",
           "--max_steps", "2", "--save_lora_adapter", "--output_dir", str(out)]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, env=_launch_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # a plain model: no PEFT needed
    assert not any("lora" in n for n, _ in plain.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = PeftModel.from_pretrained(base, out / "lora_adapter").eval()
    assert any(p.abs().sum() > 0 for n, p in lora.named_parameters() if ".lora_B." in n)
    ids = torch.arange(4, 36).view(2, 16)
    with torch.no_grad():
        merged_logits, lora_logits = plain(input_ids=ids).logits, lora(input_ids=ids).logits
        untouched = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, lora_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged_logits, untouched, atol=1e-4)


def test_estimate_memory_runs_from_the_config_alone(tmp_path, tiny_model_dir):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_model_dir / "config.json", config_only)  # no weights, no tokenizer
    # The default --data_path is a hub data set: offline, loading it would fail.
    cmd = [sys.executable, "main.py", "--model_name_or_path", str(config_only),
           "--estimate_memory", "--zero_stage", "3",
           "--lora_dim", "4", "--only_optimize_lora", "--gradient_checkpointing",
           "--num_gpus_per_node", "2", "--gpu_memory_gb", "1"]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, env=_launch_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["model_states_source"].startswith("DeepSpeed estimate_zero3")
    assert summary["fits"] and summary["largest_model_params"] > summary["model_params"]
    assert "per GPU" in run.stdout and "per node" in run.stdout
