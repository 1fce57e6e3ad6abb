"""Never lose a run: kill it anywhere, resume it, and get the uninterrupted run's result.

Real `python main.py` runs on CPU in fp32 with a tiny OPT. Resumed runs must match the
uninterrupted one bit for bit (final weights) and in every logged loss after the resume
point: the same code on the same CPU with the same thread count is deterministic, so
any difference is lost state (optimizer moments, LR schedule, data position, RNG).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from checkpoint_runs import (
    REPO,
    RESUMED,
    TOTAL_STEPS,
    losses,
    main_command,
    read_until,
    run_env,
    run_to_end,
    start,
    train_metrics,
    weights,
    write_data,
)

from utils.data.config import BatchConfig
from utils.engine import preemption
from utils.engine.checkpoint import LATEST, published_checkpoints
from utils.engine.checkpoint_checks import RUN_STATE, RunShape, check_resumable
from utils.engine.preemption import PREEMPTED_EXIT, install_preemption_handlers, stop_requested
from utils.errors import UserError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"))


def assert_same_run(resumed_log: str, out: Path, baseline: dict) -> int:
    """The resumed run continued from its checkpoint exactly as the uninterrupted run did."""
    resumed_at = int(RESUMED.search(resumed_log).group(1))
    assert sorted(losses(resumed_log)) == list(range(resumed_at + 1, TOTAL_STEPS + 1))
    # metrics.jsonl: the steps before the checkpoint from the killed run, the rest from
    # the resumed one; every loss, learning rate and gradient norm at full precision.
    assert train_metrics(out) == baseline["metrics"]
    final = weights(out)
    assert final.keys() == baseline["weights"].keys()
    for name, tensor in final.items():
        assert torch.equal(tensor, baseline["weights"][name]), name
    return resumed_at


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model_dir, data_dir) -> dict:
    """One uninterrupted run (saving every 3 steps, keeping 2)."""
    out = tmp_path_factory.mktemp("baseline")
    log = run_to_end(main_command(tiny_model_dir, data_dir, out))
    return {
        "losses": losses(log),
        "metrics": train_metrics(out),
        "weights": weights(out),
        "out": out,
        "log": log,
    }


def test_an_uninterrupted_run_keeps_only_the_newest_checkpoints(baseline):
    assert (
        sorted(baseline["losses"]) == sorted(baseline["metrics"]) == list(range(1, TOTAL_STEPS + 1))
    )
    # Every 3 steps; epoch 1 ends on step 9 (its last, short step), which is written once.
    saved = re.findall(r"saved checkpoint \S*checkpoint-(\d+)", baseline["log"])
    assert [int(step) for step in saved] == [3, 6, 9, 12, 15, 18]
    out = baseline["out"]
    assert [step for step, _ in published_checkpoints(out)] == [15, 18]  # --save_total_limit 2
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [
        "checkpoint-15",
        "checkpoint-18",
    ]
    assert (out / LATEST).read_text() == "checkpoint-18"
    assert "verified" in baseline["log"]  # the final folder reloads to the trained logits


def test_kill_9_at_a_random_step_then_resume_matches_the_uninterrupted_run(
    tmp_path, tiny_model_dir, data_dir, baseline
):
    kill_after = random.randint(4, TOTAL_STEPS - 2)
    out = tmp_path / "out"
    command = main_command(tiny_model_dir, data_dir, out)
    proc = start(command)
    read_until(proc, rf"step {kill_after}/")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    last_saved = published_checkpoints(out)[-1][0]
    assert last_saved <= kill_after

    log = run_to_end([*command, "--resume_from_checkpoint", "auto"])
    assert assert_same_run(log, out, baseline) == last_saved, f"killed after step {kill_after}"


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_to_resume(
    tmp_path, tiny_model_dir, data_dir, baseline
):
    out = tmp_path / "out"
    command = main_command(tiny_model_dir, data_dir, out)
    proc = start(command, SFT_TEST_SLOW_SAVE_STEP="6")  # the step-6 save stalls unpublished
    read_until(proc, r"saved checkpoint \S*checkpoint-3")
    while not (out / ".tmp-checkpoint-6").is_dir():
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / LATEST).read_text() == "checkpoint-3"
    assert [step for step, _ in published_checkpoints(out)] == [3]

    log = run_to_end([*command, "--resume_from_checkpoint", "auto"])
    assert assert_same_run(log, out, baseline) == 3
    assert not (out / ".tmp-checkpoint-6").exists()  # the killed save is cleaned up


def test_sigterm_checkpoints_exits_75_and_the_same_command_continues(
    tmp_path, tiny_model_dir, data_dir, baseline
):
    out = tmp_path / "out"
    command = [*main_command(tiny_model_dir, data_dir, out), "--resume_from_checkpoint", "auto"]
    proc = start(command)
    head = read_until(proc, r"step 4/")
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT, log[-3000:]
    stopped_at = int(re.search(r"stopping on SIGTERM after step (\d+)", log).group(1))
    assert stopped_at == max(losses(head + log))  # the step under way when the signal came
    assert (out / LATEST).read_text() == f"checkpoint-{stopped_at}"
    assert not (out / "model.safetensors").exists()  # preempted: no final model yet

    log = run_to_end(command)
    assert assert_same_run(log, out, baseline) == stopped_at


@pytest.fixture
def saved_checkpoint(baseline, tmp_path) -> tuple[Path, RunShape]:
    """A copy of the baseline's newest checkpoint and the shape of the run that wrote it."""
    path = tmp_path / "checkpoint-18"
    shutil.copytree(baseline["out"] / "checkpoint-18", path)
    state = json.loads((path / RUN_STATE).read_text())
    return path, RunShape(**state["shape"])


def test_resuming_with_another_model_shape_is_refused(saved_checkpoint):
    path, shape = saved_checkpoint
    name = next(iter(shape.param_shapes))
    other = {
        **shape.param_shapes,
        name: [shape.param_shapes[name][0] + 8, *shape.param_shapes[name][1:]],
    }
    with pytest.raises(
        UserError, match=rf"different model: {re.escape(name)} is .*--model_name_or_path"
    ):
        check_resumable(str(path), RunShape(shape.world_size, shape.zero_stage, other))


def test_resuming_at_another_zero_stage_is_refused(saved_checkpoint):
    path, shape = saved_checkpoint
    with pytest.raises(
        UserError, match=r"ZeRO stage 0, this run uses stage 3.*--zero_stage 0.*ds_to_universal"
    ):
        check_resumable(str(path), RunShape(shape.world_size, 3, shape.param_shapes))


def test_resuming_with_another_world_size_is_refused(saved_checkpoint):
    path, shape = saved_checkpoint
    with pytest.raises(
        UserError, match=r"written by 1 ranks, this run has 4.*--num_gpus 1.*ds_to_universal"
    ):
        check_resumable(str(path), RunShape(4, shape.zero_stage, shape.param_shapes))


def test_a_checkpoint_missing_a_rank_file_is_refused(saved_checkpoint):
    path, shape = saved_checkpoint
    (path / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(UserError, match=r"incomplete: mp_rank_00_model_states.pt missing"):
        check_resumable(str(path), shape)


def test_an_unpublished_checkpoint_is_refused_on_the_command_line(
    tmp_path, tiny_model_dir, data_dir, saved_checkpoint
):
    path, _ = saved_checkpoint
    (path / RUN_STATE).unlink()  # what a save killed before publishing leaves
    done = subprocess.run(
        [*main_command(tiny_model_dir, data_dir, tmp_path / "out"), "--resume_from_checkpoint", str(path)],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert (
        f"error: --resume_from_checkpoint {str(path)!r} is neither a complete checkpoint"
        in done.stderr
    )


@pytest.mark.parametrize(
    "batch_cfg", [BatchConfig(), BatchConfig(packing=True)], ids=["rows", "packs"]
)
def test_skipping_consumed_batches_continues_the_epochs_order(tiny_tokenizer, batch_cfg):
    from datasets import Dataset

    from utils.data.loaders import build_train_loader

    rows = Dataset.from_list([{"input_ids": [5] * (i % 7 + 2), "prompt_len": 1} for i in range(80)])
    loader = build_train_loader(
        rows,
        batch_cfg,
        micro_batch=3,
        max_seq_len=16,
        pad_token_id=tiny_tokenizer.pad_token_id,
        seed=7,
        rank=1,
        world_size=2,
        mask_dtype=torch.float32,
    )
    loader.sampler.set_epoch(4)
    full = [b["input_ids"].tolist() for b in loader]
    loader.sampler.set_epoch(4, skip=2)
    rest = [b["input_ids"].tolist() for b in loader]
    assert len(full) > 3
    assert rest == full[2:]


def test_sigusr1_and_sigterm_request_a_checkpoint_and_stop():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        install_preemption_handlers()
        assert stop_requested(torch.device("cpu")) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # the process survives: only a request
        assert stop_requested(torch.device("cpu")) == "SIGUSR1"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        preemption._requested.clear()


class Engine(torch.nn.Module):
    """The parts of a DeepSpeed engine verification uses: forward and `.module`."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, **inputs):
        return self.module(**inputs)

    def zero_optimization_stage(self) -> int:
        return 0


def test_a_saved_folder_that_does_not_reproduce_the_model_is_an_error(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from utils.distributed import DistInfo
    from utils.model.verify import SavedModelMismatch, verify_saved_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    eval_batches = [
        {
            "input_ids": torch.tensor([[2, 40, 41, 42]]),
            "attention_mask": torch.ones(1, 4, dtype=torch.long),
        }
    ]
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    verify_saved_model(Engine(model), str(tiny_model_dir), eval_batches, dist, False)

    with torch.no_grad():  # what an ungathered ZeRO-3 save looks like: empty weights
        for param in model.parameters():
            param.zero_()
    model.save_pretrained(tmp_path)
    trained = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(SavedModelMismatch, match="does not reproduce the trained model"):
        verify_saved_model(Engine(trained), str(tmp_path), eval_batches, dist, False)
