"""End-to-end runs of main.py on CPU with a tiny OPT: training, engines, saving, bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import main as cli
from tests.conftest import REPO
from utils.demo.embedded import build_rows

PPL = re.compile(r"^ppl: ([0-9.e+-]+|inf), loss: ([0-9.e+-]+)$", re.M)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Learnable instruction rows (the embedded demo's) as a local train/eval folder."""
    path = tmp_path_factory.mktemp("data")
    train, evaluation = build_rows(seed=0)
    for name, rows in (("train.jsonl", train[:160]), ("eval.jsonl", evaluation[:24])):
        with open(path / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def base_args(model_dir, data_dir, tmp_path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir),
        "--data_path", str(data_dir),
        "--data_split", "10,0,0",
        "--data_output_path", str(tmp_path / "cache"),
        "--max_seq_len", "64",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8",
        "--learning_rate", "3e-3",
        "--output_dir", str(tmp_path / "out"),
        *extra,
    ]  # fmt: skip


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def perplexities(out: str) -> list[float]:
    return [float(m.group(1)) for m in PPL.finditer(out)]


def test_training_lowers_eval_perplexity_and_saves_a_loadable_model(
    tiny_model_dir, data_dir, tmp_path, capsys
):
    argv = base_args(tiny_model_dir, data_dir, tmp_path, "--num_train_epochs", "2")
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    ppl = perplexities(out)
    assert len(ppl) == 3, out  # before training and after each epoch
    assert ppl[-1] < ppl[0] / 2
    saved = tmp_path / "out"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (saved / name).is_file(), name
    assert not [p for p in os.listdir(saved) if p.startswith(".saving-")]


@pytest.mark.parametrize("extra", [
    ["--zero_stage", "0"],
    ["--zero_stage", "2"],
    ["--zero_stage", "3"],
    ["--zero_stage", "2", "--offload"],
    ["--zero_stage", "1", "--dtype", "bf16"],
    ["--zero_stage", "0", "--gradient_checkpointing", "--compute_fp32_loss"],
], ids=["zero0", "zero2", "zero3", "zero2-offload", "zero1-bf16", "zero0-gc-fp32loss"])  # fmt: skip
def test_engine_variants_train(tiny_model_dir, data_dir, tmp_path, capsys, extra):
    argv = base_args(tiny_model_dir, data_dir, tmp_path, "--max_steps", "12", *extra)
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    ppl = perplexities(out)
    assert ppl[-1] < ppl[0], out
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_saved_folder_gives_the_engines_logits(tiny_model_dir, data_dir, tmp_path):
    """The saved folder must reproduce exactly what the trained engine computes."""
    from utils.cli.parse import parse_args
    from utils.cli.validate import validate
    from utils.data.build import build_sft_data
    from utils.distributed import init_distributed
    from utils.model.load import build_model
    from utils.model.loss import model_nll
    from utils.model.save import save_hf_model

    cfg = parse_args(base_args(tiny_model_dir, data_dir, tmp_path, "--zero_stage", "3"))
    dist = init_distributed()
    setup = validate(cfg, dist)
    tokenizer = setup.tokenizer
    data = build_sft_data(cfg.data, tokenizer, setup.template)
    loader, _ = cli.build_loaders(cfg, data, setup, dist)
    plan = cli.build_step_plan(cfg, loader)
    model = build_model(cfg.model, setup.model_config, tokenizer, setup.engine.config)
    engine = cli.build_engine(cfg, model, setup.engine, plan, dist)
    for _, batch in zip(range(5), loader, strict=False):
        nll, count = model_nll(engine, batch, fp32=False)
        engine.backward(nll / count)
        engine.step()
    engine.eval()
    with torch.no_grad():
        expected = engine(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    save_hf_model(engine.module, tokenizer, str(tmp_path / "out"), zero_stage=3)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_two_rank_zero3_saves_every_tensor_at_full_shape(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    argv = base_args(tiny_model_dir, data_dir, tmp_path, "--zero_stage", "3", "--max_steps", "4")
    cmd = [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        "29731",
        os.path.join(REPO, "main.py"),
        *argv,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    saved = load_file(out / "model.safetensors")
    expected = {k: v.shape for k, v in initial.state_dict().items() if k in saved}
    assert set(expected) == set(saved), "saved tensors differ from the model's"
    assert all(saved[k].shape == shape for k, shape in expected.items())
    trained = AutoModelForCausalLM.from_pretrained(out)
    changed = [
        k for k, v in trained.state_dict().items() if not torch.equal(v, initial.state_dict()[k])
    ]
    assert changed, "the saved weights are the untrained ones"
    assert len(perplexities(result.stdout)) == 2, "only rank 0 logs evaluation"


def test_dry_run_prints_the_plan_as_json_and_trains_nothing(
    tiny_model_dir, data_dir, tmp_path, capsys
):
    argv = base_args(tiny_model_dir, data_dir, tmp_path, "--dry_run", "--data_split", "2,4,4")
    code, out, _ = run_main(argv, capsys)
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["train_rows"] == sum(s["train_rows"] for s in summary["sources"])
    assert 0 < summary["train_rows"] < 160  # 2,4,4 leaves SFT a fifth
    assert summary["train_tokens"] > summary["train_rows"]
    assert summary["parameters"] == summary["trainable_parameters"] > 0
    assert summary["deepspeed_config"]["train_batch_size"] == 8
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--zero_stage", "5"], "--zero_stage 5"),
    (["--dtype", "fp16"], "--dtype fp16 needs a GPU"),
    (["--max_seq_len", "4096"], "--max_seq_len 4096 is longer than the model's 512 positions"),
    (["--only_optimize_lora"], "--only_optimize_lora needs LoRA"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0"),
], ids=["zero5", "fp16-cpu", "seq-too-long", "lora-only-without-lora", "batch0"])  # fmt: skip
def test_bad_flags_fail_fast_with_a_clear_message(
    tiny_model_dir, data_dir, tmp_path, capsys, extra, message
):
    code, _out, err = run_main(base_args(tiny_model_dir, data_dir, tmp_path, *extra), capsys)
    assert code == 2
    assert message in err
    assert not (tmp_path / "out").exists(), "nothing may be written on bad input"


def test_all_problems_are_reported_together(tiny_model_dir, data_dir, tmp_path, capsys):
    argv = base_args(
        tiny_model_dir, data_dir, tmp_path, "--zero_stage", "7", "--num_train_epochs", "0"
    )
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert "--zero_stage 7" in err and "--num_train_epochs 0" in err


def test_missing_model_offline_names_the_path_and_the_fix(data_dir, tmp_path, capsys):
    argv = base_args("no-such-org/no-such-model", data_dir, tmp_path)
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert "no-such-org/no-such-model" in err and "local folder" in err


def test_unwritable_output_dir_is_refused(tiny_model_dir, data_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = base_args(tiny_model_dir, data_dir, tmp_path)
    argv[argv.index("--output_dir") + 1] = str(blocker / "out")
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert "--output_dir" in err


def test_empty_eval_set_is_refused(tiny_model_dir, data_dir, tmp_path, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    (empty / "train.jsonl").write_text((data_dir / "train.jsonl").read_text())
    (empty / "eval.jsonl").write_text("")
    code, _, err = run_main(base_args(tiny_model_dir, empty, tmp_path), capsys)
    assert code == 2
    assert f"{empty / 'eval.jsonl'} is empty" in err


def test_unknown_choice_is_an_argparse_error(tiny_model_dir, data_dir, tmp_path):
    argv = base_args(tiny_model_dir, data_dir, tmp_path, "--lr_scheduler_type", "zigzag")
    result = subprocess.run(
        [sys.executable, "main.py", *argv], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2
    assert "zigzag" in result.stderr
