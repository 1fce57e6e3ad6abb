"""What a user watches: the run summary, progress output, metrics.jsonl, TensorBoard,
the curves PNG, and failures that explain themselves. No DeepSpeed engine needed."""

from __future__ import annotations

import io
import json
import os
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from PIL import Image

from tests.conftest import summary_setup
from utils.cli.failures import OOM_EXIT_CODE, explain_failures, suggest_memory_flags
from utils.cli.parse import parse_args
from utils.cli.summary import build_summary, data_warnings
from utils.data.common import SFTData, SourceStats
from utils.engine.accumulation import StepPlan
from utils.observe.progress import RunMonitor, load_metrics, open_metrics


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_a_few_steps(monitor: RunMonitor, start: int = 0, steps: int = 20) -> None:
    for step in range(start + 1, start + steps + 1):
        monitor.advance(step)
        if step % 5 == 0:
            monitor.record_step(step, 1, loss=5.0 - step / 10, lr=1e-3, tokens_per_s=1234.5)
        if step % 10 == 0:
            monitor.record_eval(step, 1, SimpleNamespace(loss=4.0, perplexity=54.6))
    monitor.close()


def test_log_output_without_a_terminal_is_plain_lines(tmp_path):
    stream = io.StringIO()
    run_a_few_steps(RunMonitor(str(tmp_path), 20, stream=stream, enabled=True))
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 4  # one per logging interval
    assert lines[-1].startswith("epoch 1 step 20/20 loss 3.0000 lr 0.001 tokens_per_s 1234")
    assert "eta 0:00:00" in lines[-1]


def test_a_terminal_gets_a_progress_bar(tmp_path):
    stream = FakeTerminal()
    run_a_few_steps(RunMonitor(str(tmp_path), 20, stream=stream, enabled=True))
    text = stream.getvalue()
    assert "\r" in text and "20/20" in text and "loss 3.0000" in text


def test_metrics_file_has_train_and_eval_rows_and_curves_are_a_png(tmp_path):
    run_a_few_steps(RunMonitor(str(tmp_path), 20, stream=io.StringIO(), enabled=True))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == [5, 10, 15, 20]
    evals = [r for r in rows if r["type"] == "eval"]
    assert [(r["step"], r["eval_loss"], r["eval_perplexity"]) for r in evals] == [
        (10, 4.0, 54.6),
        (20, 4.0, 54.6),
    ]
    with Image.open(tmp_path / "training_curves.png") as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] >= 400


def test_resumed_run_continues_metrics_and_drops_rows_after_its_checkpoint(tmp_path):
    run_a_few_steps(RunMonitor(str(tmp_path), 40, stream=io.StringIO(), enabled=True))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "st')  # a crash in the middle of a line
    resumed = RunMonitor(str(tmp_path), 40, start_step=10, stream=io.StringIO(), enabled=True)
    run_a_few_steps(resumed, start=10)
    steps = [
        r["step"] for r in load_metrics(str(tmp_path / "metrics.jsonl")) if r["type"] == "train"
    ]
    assert steps == [5, 10, 15, 20, 25, 30]  # 15 and 20 of the first run were after step 10


def test_fresh_run_starts_a_new_metrics_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"type": "train", "step": 99}\n')
    open_metrics(str(tmp_path / "metrics.jsonl"), start_step=0).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_non_finite_values_are_written_as_null(tmp_path):
    monitor = RunMonitor(str(tmp_path), 1, stream=io.StringIO(), enabled=True)
    monitor.record_eval(1, 1, SimpleNamespace(loss=float("inf"), perplexity=float("inf")))
    monitor.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())  # strict JSON: no Infinity
    assert row["eval_perplexity"] is None


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = tmp_path / "tb"
    monitor = RunMonitor(None, 20, tensorboard_dir=str(board), stream=io.StringIO(), enabled=True)
    run_a_few_steps(monitor)
    events = EventAccumulator(str(board))
    events.Reload()
    assert {"train/loss", "train/lr", "eval/loss", "eval/perplexity"} <= set(
        events.Tags()["scalars"]
    )
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20]


def test_other_ranks_write_nothing(tmp_path):
    stream = io.StringIO()
    run_a_few_steps(RunMonitor(str(tmp_path), 20, stream=stream, enabled=False))
    assert stream.getvalue() == "" and os.listdir(tmp_path) == []


def test_skipped_fp16_steps_are_counted(tmp_path, capsys):
    monitor = RunMonitor(str(tmp_path), 10, stream=io.StringIO(), enabled=True)
    monitor.record_step(10, 1, loss=2.0, skipped_steps=3)
    monitor.close()
    assert "3 optimizer steps were skipped" in capsys.readouterr().err
    assert load_metrics(str(tmp_path / "metrics.jsonl"))[0]["skipped_steps"] == 3


def sft_data(truncated: int = 0, skipped: int = 0) -> SFTData:
    rows = {"input_ids": [[1, 5, 6, 7], [1, 8, 9]], "loss_spans": [[[2, 4]], [[1, 3]]]}
    stats = SourceStats("Dahoas/rm-static", 2, 1, skipped, truncated, 7)
    return SFTData(Dataset.from_dict(rows), Dataset.from_dict(rows), [stats])


def test_summary_block_has_the_numbers_a_user_checks(tiny_model_dir):
    flags = ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2"]
    flags += ["--num_train_epochs", "3", "--zero_stage", "3", "--output_dir", "out"]
    cfg = parse_args(["--model_name_or_path", str(tiny_model_dir), *flags])
    ds_config = {
        "train_batch_size": 4,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": True},
    }
    setup = summary_setup(ds_config, world_size=2, dtype_reason="--dtype bf16")
    plan = StepPlan(micro_batches_per_epoch=1, accumulation=2, epochs=3)
    text = build_summary(cfg, sft_data(), (2_000_000, 500_000), setup, plan)
    assert "2.00M total, 500.00K trainable (25.0%)" in text
    assert "Dahoas/rm-static" in text and "7 training tokens" in text
    assert "1 sequences per device x 2 ranks x 2 accumulation = 4 per optimizer step" in text
    # 1 micro-batch per epoch: each epoch ends on its (short) step.
    assert "1 micro-batch = 1 step per epoch x 3 epochs = 3 optimizer steps" in text
    assert "ZeRO stage 3, bf16" in text
    assert os.path.abspath("out") in text


def test_warnings_for_minority_split_truncated_and_skipped_rows(tiny_model_dir):
    cfg = parse_args(["--model_name_or_path", str(tiny_model_dir)])  # default split 2,4,4
    warnings = data_warnings(cfg, sft_data(truncated=12, skipped=3))
    assert any("only 20%" in w and "--data_split 10,0,0" in w for w in warnings)
    assert any("12 rows are longer than --max_seq_len 512" in w for w in warnings)
    assert any("3 rows were skipped" in w for w in warnings)
    cfg = parse_args(["--model_name_or_path", "m", "--data_split", "10,0,0"])
    assert data_warnings(cfg, sft_data()) == []


def test_memory_suggestions_follow_the_flags_in_use():
    cfg = parse_args(["--model_name_or_path", "m", "--per_device_train_batch_size", "8"])
    flags = " ".join(suggest_memory_flags(cfg, None))
    for flag in ("--gradient_checkpointing", "--zero_stage 3", "--offload"):
        assert flag in flags
    assert "--per_device_train_batch_size 4 --gradient_accumulation_steps 2" in flags
    everything = ["--gradient_checkpointing", "--zero_stage", "3", "--offload", "--lora_dim", "8"]
    cfg = parse_args(
        ["--model_name_or_path", "m", "--per_device_train_batch_size", "1", *everything]
    )
    assert suggest_memory_flags(cfg, None) == []
    assert suggest_memory_flags(cfg, None, cpu=True) == [
        "no --offload (it keeps optimizer states in CPU memory)"
    ]


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
        ),
    ],
)
def test_out_of_memory_ends_with_the_flags_that_would_fit(capsys, error):
    with (
        pytest.raises(SystemExit) as exit_info,
        explain_failures(lambda: (parse_args(["--model_name_or_path", "m"]), None)),
    ):
        raise error
    assert exit_info.value.code == OOM_EXIT_CODE
    err = capsys.readouterr().err
    assert "out of memory" in err and "--gradient_checkpointing" in err and "--zero_stage 3" in err


def test_a_failing_rank_names_itself_on_stderr(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError), explain_failures(lambda: (None, None)):
        raise ValueError("bad batch")
    assert "[rank 1 on " in capsys.readouterr().err
