"""Shared fixtures: tiny tokenizers and OPT models built in code, never downloaded."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent  # the checkout the tests run from

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

CORPUS = [
    " Human: What is the capital of France? Assistant: The capital of France is Paris.",
    " Human: What is 2 plus 3? Assistant: 2 plus 3 is 5.",
    " Human: Name a color of the sky. Assistant: The sky is blue.",
    " Human: Say hello. Assistant: Hello! How can I help you today?",
    " Human: Translate cat to French. Assistant: Cat in French is chat.",
] * 20

# An in-process run (main() called by a test) leaves its one-rank group's variables in
# os.environ; a child process that inherited them would try to join or bind that group.
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child that must start a group of its own."""
    return {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, **extra}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from utils.demo.tiny import build_tokenizer

    return build_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny OPT (model + tokenizer) folder, as a user would pass to --model_name_or_path."""
    from utils.demo.tiny import build_opt_model

    path = tmp_path_factory.mktemp("tiny-opt")
    build_opt_model(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def one_rank_group(monkeypatch):
    """A one-rank group for an in-process engine (reused if main() already made one, as
    tests/runs/test_main.py does); the launcher variables are restored afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    from utils.distributed import init_distributed

    return init_distributed()


class EngineStub(torch.nn.Module):
    """The parts of a DeepSpeed engine verification uses: forward and `.module`."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, **inputs):
        return self.module(**inputs)

    def zero_optimization_stage(self) -> int:
        return 0


def summary_setup(
    ds_config: dict, *, world_size: int = 1, dtype_reason: str = "--dtype fp32", loss=None
):
    """A RunSetup with what the run summary reads: the merged DeepSpeed config, the world
    size and the loss path (the plain fp32 loss unless `loss` says otherwise)."""
    from utils.data.loaders import NO_WORKERS
    from utils.engine.ds_config import EngineSetup
    from utils.model.loss import PLAIN_FP32
    from utils.run_setup import RunSetup

    return RunSetup(
        engine=EngineSetup(config=ds_config, dtype_reason=dtype_reason),
        attention=None,
        attention_reason="",
        pack_layout="mask",
        loss=loss or PLAIN_FP32,
        model_config=None,
        tokenizer=None,
        template=None,
        world_size=world_size,
        loader=NO_WORKERS,
    )


# A chat template that drops the reasoning (<think>...</think>) of earlier assistant turns,
# as Qwen3's and DeepSeek-R1's do.
DROPS_REASONING = """\
{%- for message in messages %}
{%- set content = message['content'] %}
{%- if message['role'] == 'assistant' and not loop.last %}{% set content = content.split('</think>')[-1] %}{% endif %}
{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}
"""


def write_rows(path, train: int, evaluation: int = 4):
    """A local data folder of "What is i plus i?" rows: `train` and `evaluation` of them."""
    path.mkdir()
    for name, count in (("train", train), ("eval", evaluation)):
        rows = [
            {"prompt": f" Human: What is {i} plus {i}?", "chosen": f" {i} plus {i} is {2 * i}."}
            for i in range(count)
        ]
        (path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_args(model_dir, data_dir, tmp_path, *extra: str) -> list[str]:
    """main.py's flags for a short run of `model_dir` on `data_dir` (written by write_rows)."""
    return [
        "--model_name_or_path", str(model_dir),
        "--data_path", str(data_dir),
        "--data_split", "10,0,0",
        "--data_output_path", str(tmp_path / "cache"),
        "--max_seq_len", "32",
        "--learning_rate", "1e-2",
        "--output_dir", str(tmp_path / "out"),
        *extra,
    ]  # fmt: skip
