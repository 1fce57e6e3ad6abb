"""What a resume may change: nothing that decides the data, its order or the optimisation;
the shape only while the global batch stays (utils/checkpoint/settings.py, resume.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from utils.checkpoint.checks import RunShape
from utils.checkpoint.resume import prepare_load
from utils.checkpoint.settings import run_settings, settings_changes
from utils.data.config import BatchConfig, DataConfig
from utils.distributed import DistInfo
from utils.engine.config import TrainConfig
from utils.errors import UserError
from utils.model.config import LoraConfig

CHAT = ("seed", "chat_template", "system_prompt")  # DataConfig fields settings() takes


def settings(micro=2, world=2, accumulation=2, key="k", **changes) -> dict:
    train = TrainConfig(per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation)
    lora = LoraConfig(**{k: v for k, v in changes.items() if k.startswith("lora_")})
    data = DataConfig(data_path=["rows.jsonl"], **{k: v for k, v in changes.items() if k in CHAT})
    run = SimpleNamespace(data=data, batch=BatchConfig(), train=train, lora=lora)
    return run_settings(run, key, world_size=world)


@pytest.mark.parametrize("current", [(4, 1, 2), (2, 1, 4), (1, 4, 2), (8, 1, 1)])
def test_another_shape_with_the_same_global_batch_is_the_same_run(current):
    assert settings_changes(settings(), settings(*current)) == []


@pytest.mark.parametrize(
    ("saved", "current", "fix"),
    [
        ((2, 2, 2), (2, 1, 2), "--per_device_train_batch_size 4 --gradient_accumulation_steps 2"),
        ((2, 4, 1), (2, 1, 1), "--per_device_train_batch_size 8 --gradient_accumulation_steps 1"),
        ((4, 2, 3), (4, 4, 3), "--per_device_train_batch_size 2 --gradient_accumulation_steps 3"),
        ((3, 2, 2), (3, 4, 2), "--per_device_train_batch_size 3 --gradient_accumulation_steps 1"),
    ],
)
def test_a_changed_global_batch_is_refused_with_flags_that_keep_it(saved, current, fix):
    (change,) = settings_changes(settings(*saved), settings(*current))
    assert change.startswith("global batch (--per_device_train_batch_size x ranks x ")
    assert fix in change


def test_a_global_batch_the_new_ranks_cannot_share_names_rank_counts_that_can():
    (change,) = settings_changes(settings(2, 2, 2), settings(2, 3, 2))
    assert "8 rows per step cannot be shared by 3 ranks" in change


def test_lora_settings_count_only_with_lora():
    assert settings_changes(settings(lora_learning_rate=1e-4), settings()) == []
    with_lora = settings(lora_dim=8, lora_learning_rate=1e-4)
    (change,) = settings_changes(with_lora, settings(lora_dim=8))
    assert change == (
        "--lora_learning_rate 0.0001 in the checkpoint, 0.0005 now: pass --lora_learning_rate 0.0001"
    )
    (change,) = settings_changes(with_lora, settings(lora_learning_rate=1e-4))
    assert change.startswith("--lora_dim 8 in the checkpoint, 0 now")


def test_the_data_cache_key_speaks_only_when_no_data_flag_explains_it():
    (change,) = settings_changes(settings(seed=1), settings(seed=2, key="other"))
    assert change == "--seed 1 in the checkpoint, 2 now: pass --seed 1"
    (change,) = settings_changes(settings(), settings(key="other"))
    assert change.startswith("the training data changed (tokenised-data cache key k in the")


def test_a_changed_chat_template_or_system_prompt_is_named():
    saved = settings(chat_template="t.jinja")
    (change,) = settings_changes(saved, settings(key="other"))
    assert (
        change
        == "--chat_template t.jinja in the checkpoint, dschat now: pass --chat_template t.jinja"
    )
    (change,) = settings_changes(saved, settings(chat_template="t.jinja", system_prompt="Hi."))
    assert change.startswith(
        "--system_prompt unset in the checkpoint, Hi. now: leave out --system_prompt"
    )


def test_a_bf16_zero0_checkpoint_stays_on_its_number_of_ranks():
    state = {
        "shape": {"world_size": 2, "zero_stage": 0, "param_shapes": {}},
        "files": ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"],
    }
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(UserError, match=r"loads only on 2 ranks. Relaunch with 2 processes"):
        prepare_load("ckpt", state, RunShape(1, 0, {}), dist)
    state["files"] = state["files"][1:]  # fp32 at ZeRO-0: the whole state on every rank
    assert prepare_load("ckpt", state, RunShape(1, 0, {}), dist) is None
