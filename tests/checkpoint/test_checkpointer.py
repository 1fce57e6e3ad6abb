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

from tests.checkpoint_runs import (
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
from tests.conftest import EngineStub
from utils.checkpoint import preemption
from utils.checkpoint.checkpointer import Checkpointer, build_checkpointer
from utils.checkpoint.checks import (
    RUN_STATE,
    RunShape,
    check_files,
    check_model,
    published_checkpoints,
    read_run_state,
)
from utils.checkpoint.position import DataPosition, start_epoch
from utils.checkpoint.preemption import PREEMPTED_EXIT, install_preemption_handlers, stop_requested
from utils.checkpoint.resume import load_checkpoint
from utils.checkpoint.settings import run_settings
from utils.checkpoint.store import LATEST, prune_checkpoints
from utils.cli.parse import parse_args
from utils.data.config import BatchConfig
from utils.distributed import DistInfo
from utils.engine.accumulation import accumulation_windows
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
    state = read_run_state(str(path))
    with pytest.raises(
        UserError, match=rf"different model: {re.escape(name)} is .*--model_name_or_path"
    ):
        check_model(str(path), state, RunShape(shape.world_size, shape.zero_stage, other))


def test_a_checkpoint_missing_a_rank_file_is_refused(saved_checkpoint):
    path, _ = saved_checkpoint
    (path / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(UserError, match=r"incomplete: mp_rank_00_model_states.pt missing"):
        check_files(str(path), read_run_state(str(path)))


def vet(data_dir: Path, out: Path, *flags: str, data_key: str) -> Checkpointer:
    """build_checkpointer, as main.py calls it before the model loads, for the checkpoint
    tests' command line plus `flags` (`data_key`: the data as built for this command)."""
    cfg = parse_args(main_command("model", data_dir, out, *flags)[2:])
    settings = run_settings(cfg, data_key, world_size=1)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return build_checkpointer(cfg.checkpoint, cfg.train.output_dir, settings, dist)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize(
    ("flags", "changes"),
    [
        (
            ["--per_device_train_batch_size", "4"],
            [
                "global batch (--per_device_train_batch_size x ranks x "
                "--gradient_accumulation_steps) 2 x 1 x 2 = 4 in the checkpoint, 4 x 1 x 2 = 8 "
                "now: keep it with --per_device_train_batch_size 2 --gradient_accumulation_steps 2 "
                "on 1 rank"
            ],
        ),
        (["--seed", "42"], ["--seed 1234 in the checkpoint, 42 now: pass --seed 1234"]),
        (
            ["--learning_rate", "1e-3"],
            ["--learning_rate 0.003 in the checkpoint, 0.001 now: pass --learning_rate 0.003"],
        ),
        (
            ["--num_train_epochs", "3"],
            ["--num_train_epochs 2 in the checkpoint, 3 now: pass --num_train_epochs 2"],
        ),
        (
            ["--packing", "--max_steps", "5", "--lr_scheduler_type", "linear"],
            [
                "--max_steps unset in the checkpoint, 5 now: leave out --max_steps",
                "--lr_scheduler_type cosine in the checkpoint, linear now: pass "
                "--lr_scheduler_type cosine",
                "--packing off in the checkpoint, on now: leave out --packing",
            ],
        ),
    ],
    ids=["batch", "seed", "learning-rate", "epochs", "several"],
)
def test_a_resume_that_would_change_the_run_is_refused_with_each_change(
    saved_checkpoint, data_dir, flags, changes
):
    path, _ = saved_checkpoint
    key = read_run_state(str(path))["settings"]["data_cache_key"]
    with pytest.raises(UserError) as refused:
        vet(
            data_dir,
            path.parent / "out",
            "--resume_from_checkpoint",
            str(path),
            *flags,
            data_key=key,
        )
    lines = str(refused.value).splitlines()
    assert lines[0].startswith(f"checkpoint {path} was trained with other settings")
    assert lines[1:-1] == [f"  - {change}" for change in changes]


def test_a_resume_may_change_the_shape_and_logging_but_not_the_data(saved_checkpoint, data_dir):
    path, _ = saved_checkpoint
    key = read_run_state(str(path))["settings"]["data_cache_key"]
    free = ["--save_steps", "5", "--save_total_limit", "1", "--enable_tensorboard"]
    geometry = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"]
    resume = ["--resume_from_checkpoint", str(path), "--zero_stage", "2", *free, *geometry]
    assert vet(data_dir, path.parent / "elsewhere", *resume, data_key=key).resume_from == str(path)
    with pytest.raises(UserError, match=r"the training data changed \(tokenised-data cache key"):
        vet(data_dir, path.parent / "elsewhere", *resume, data_key="another")


def test_a_damaged_run_state_names_the_file_and_the_checkpoint_before_it(
    baseline, data_dir, tmp_path
):
    out = tmp_path / "out"
    for step in (15, 18):
        shutil.copytree(baseline["out"] / f"checkpoint-{step}", out / f"checkpoint-{step}")
    (out / "checkpoint-18" / RUN_STATE).write_text('{"step": 18, "posi')  # cut off
    with pytest.raises(UserError) as refused:
        vet(data_dir, out, "--resume_from_checkpoint", "auto", data_key="")
    assert str(refused.value).startswith(
        f"checkpoint file {out}/checkpoint-18/{RUN_STATE} does not parse: "
    )
    assert f"resume from an earlier checkpoint: --resume_from_checkpoint {out}/checkpoint-15" in (
        str(refused.value)
    )


def test_a_truncated_checkpoint_file_ends_with_one_message_and_exit_2(
    baseline, data_dir, tiny_model_dir, tmp_path
):
    out = tmp_path / "out"
    for step in (15, 18):
        shutil.copytree(baseline["out"] / f"checkpoint-{step}", out / f"checkpoint-{step}")
    states = out / "checkpoint-18" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])  # a partial copy
    command = [*main_command(tiny_model_dir, data_dir, out), "--resume_from_checkpoint", "auto"]
    done = subprocess.run(
        command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: checkpoint file {states} is not a whole torch file")
    assert error.endswith(
        f"resume from an earlier checkpoint: --resume_from_checkpoint {out}/checkpoint-15 (or "
        f"delete {out}/checkpoint-18, and 'auto' picks the newest remaining one)."
    )


def test_a_file_damaged_inside_is_named_when_loading_it_fails(saved_checkpoint):
    path, _ = saved_checkpoint
    state = read_run_state(str(path))

    class Engine:  # what DeepSpeed does with a damaged file: torch.load raises
        def load_checkpoint(self, load_dir, tag):
            raise RuntimeError("PytorchStreamReader failed reading file data/0")

    with pytest.raises(RuntimeError, match="PytorchStreamReader"):  # no file is damaged: a bug
        load_checkpoint(Engine(), str(path), state, universal=None)
    file = path / "mp_rank_00_model_states.pt"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensors
    file.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"checkpoint file {re.escape(str(file))} fails its"):
        load_checkpoint(Engine(), str(path), state, universal=None)


def test_a_killed_delete_leaves_no_half_checkpoint_and_the_next_start_sweeps_it(
    tmp_path, data_dir, monkeypatch
):
    out = tmp_path / "out"
    for step in (3, 6, 9):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "weights.pt").write_bytes(b"x" * 10)
        (out / f"checkpoint-{step}" / RUN_STATE).write_text("{}")
    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        if ignore_errors:  # clearing an old leftover, not the delete under test
            return real_rmtree(path, ignore_errors=True)
        os.remove(os.path.join(path, "weights.pt"))  # some files go, then the kill comes
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(str(out), keep=2)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    names = sorted(p.name for p in out.iterdir())
    assert names == [".tmp-checkpoint-3.removing", "checkpoint-6", "checkpoint-9"]
    assert [step for step, _ in published_checkpoints(out)] == [6, 9]

    (out / ".tmp-checkpoint-12").mkdir()  # a save killed before publishing
    (out / ".latest.k2j4x9.tmp").write_text("checkpoint-1")  # a rewrite of `latest` killed
    vet(data_dir, out, data_key="")  # any start (no resume, no save yet): rank 0 sweeps
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-6", "checkpoint-9"]


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
    "batch_cfg",
    [BatchConfig(loss_on="all"), BatchConfig(packing=True, loss_on="all")],
    ids=["rows", "packs"],
)
def test_skipping_consumed_batches_continues_the_epochs_order(tiny_tokenizer, batch_cfg):
    from datasets import Dataset

    from utils.data.loaders import build_train_loader

    rows = Dataset.from_list(
        [{"input_ids": [5] * (i % 7 + 2), "loss_spans": [[1, 2]]} for i in range(80)]
    )
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
        on_gpu=False,
    )
    loader.sampler.set_epoch(4)
    full = [b["input_ids"].tolist() for b in loader]
    rows = sum(len(batch) for batch in loader.sampler.global_batches()[:2])
    start_epoch(loader.sampler, DataPosition(4, rows_done=rows, order_rows_per_micro_step=6))
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
        # The loop learns it from the next step's token-count all-reduce (no collective of its own).
        labels = torch.tensor([[5, 6, 7]])
        (window,) = accumulation_windows([{"labels": labels}], 1, torch.device("cpu"))
        assert (window.stop, window.tokens) == ("SIGUSR1", 2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        preemption._requested.clear()


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
    verify_saved_model(EngineStub(model), str(tiny_model_dir), eval_batches, dist, False)

    with torch.no_grad():  # what an ungathered ZeRO-3 save looks like: empty weights
        for param in model.parameters():
            param.zero_()
    model.save_pretrained(tmp_path)
    trained = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(SavedModelMismatch, match="does not reproduce the trained model"):
        verify_saved_model(EngineStub(trained), str(tmp_path), eval_batches, dist, False)
