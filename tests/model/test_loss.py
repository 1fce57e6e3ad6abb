"""Token-weighted loss: a step over micro-batches and ranks equals one big batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.token_loss_worker import PAD, build_model, build_rows
from utils.data.collate import collate
from utils.engine.accumulation import StepPlan, accumulation_windows
from utils.model.loss import token_nll
from utils.observe.progress import load_metrics

CPU = torch.device("cpu")


def sgd_step(batches: list[list[dict]], token_weighted: bool) -> dict[str, torch.Tensor]:
    """Weights after one SGD step (lr 1) on the mean loss, computed without DeepSpeed and
    with the plain loss (full logits); "loss" holds that loss before the step."""
    model = build_model()
    losses = []
    for rows in batches:
        batch = collate(rows, pad_token_id=PAD, loss_on="all")
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses.append(token_nll(logits, batch["labels"], fp32=True))
    if token_weighted:
        loss = sum(nll for nll, _ in losses) / sum(count for _, count in losses)
    else:
        loss = sum(nll / count for nll, count in losses) / len(losses)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= p.grad
    return {**{k: v.clone() for k, v in model.state_dict().items()}, "loss": loss.detach()}


def run_worker(tmp_path, ranks: int, zero_stage: int, micro: int, accumulation: int) -> dict:
    out = str(tmp_path / f"weights-{ranks}.safetensors")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={ranks}", os.path.join(REPO, "tests", "token_loss_worker.py")]
    cmd += [out, "token", str(zero_stage), str(micro), str(accumulation)]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return load_file(out)


def assert_same_weights(got: dict, expected: dict) -> None:
    for name, value in expected.items():
        if name != "loss":
            assert torch.allclose(got[name], value, atol=1e-5), name


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ranks", "zero_stage", "micro"),
    [(1, 0, 4), (2, 2, 2)],  # 8 rows in one step: 2 micro-batches per rank
)
def test_step_over_micro_batches_and_ranks_equals_one_big_batch(tmp_path, ranks, zero_stage, micro):
    rows = build_rows()
    expected = sgd_step([rows], token_weighted=True)
    # The check can fail: with unequal micro-batches, a mean of means is another update.
    halves = sgd_step([rows[:4], rows[4:]], token_weighted=False)
    assert not torch.allclose(halves["lm_head.weight"], expected["lm_head.weight"], atol=1e-4)
    # The loop trains with the chunked loss: same update, and it logs the plain loss's value.
    assert_same_weights(run_worker(tmp_path, ranks, zero_stage, micro, 2), expected)
    (logged,) = [r for r in load_metrics(str(tmp_path / "metrics.jsonl")) if r["type"] == "train"]
    assert logged["loss"] == pytest.approx(float(expected["loss"]), rel=1e-6)


def test_an_epochs_last_short_window_is_still_an_optimizer_step():
    def batch(tokens: int) -> dict:
        return {"labels": torch.tensor([[-100] + [5] * tokens])}

    windows = list(accumulation_windows([batch(n) for n in (1, 2, 3, 4, 5)], 2, CPU))
    assert [len(w.batches) for w in windows] == [2, 2, 1]
    assert [w.tokens for w in windows] == [3, 7, 5]  # the short step weighs what it holds
    plan = StepPlan(micro_batches_per_epoch=5, accumulation=2, epochs=3)
    assert (plan.steps_per_epoch, plan.total_steps) == (3, 9)
    # Fewer micro-batches than one window: still one step per epoch, never zero.
    assert StepPlan(micro_batches_per_epoch=2, accumulation=4, epochs=1).total_steps == 1
