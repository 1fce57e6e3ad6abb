"""Chat templates through the data chain: build, skips counted, cache key, loaders, summary."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from tests.conftest import CORPUS, DROPS_REASONING, summary_setup
from utils.cli.parse import parse_args
from utils.cli.summary import build_summary, data_warnings
from utils.data.build import build_sft_data
from utils.data.chat import load_chat_template
from utils.data.common import IGNORE_INDEX
from utils.data.config import BatchConfig, DataConfig
from utils.data.labels import build_labels, trained_tokens
from utils.data.loaders import build_train_loader
from utils.demo.chat_data import TEMPLATE_PATH, add_chat_tokens, build_chat_rows
from utils.demo.tiny import build_tokenizer
from utils.engine.accumulation import StepPlan

CHATML = str(TEMPLATE_PATH)


@pytest.fixture(scope="module")
def tok():
    tokenizer = build_tokenizer(CORPUS, vocab_size=400)
    add_chat_tokens(tokenizer)
    return tokenizer


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def write_split(folder, name: str, rows: list[dict]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def config(tmp_path, data_path: str, **kw) -> DataConfig:
    kw.setdefault("chat_template", CHATML)
    kw.setdefault("max_seq_len", 512)
    return DataConfig(
        data_path=[data_path], data_split="10,0,0", data_output_path=str(tmp_path / "cache"), **kw
    )


def build(cfg: DataConfig, tok):
    """build_sft_data with the --chat_template as start-up loads it."""
    return build_sft_data(cfg, tok, load_chat_template(cfg.chat_template, tok))


def spans_text(tok, row: dict) -> list[str]:
    return [tok.decode(row["input_ids"][s:e]) for s, e in row["loss_spans"]]


GOOD = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        user("What is 2 plus 3?"),
        assistant("2 plus 3 is 5."),
        user("What is the capital of France?"),
        assistant("The capital of France is Paris."),
    ]
}


def test_bad_conversations_are_skipped_and_counted_by_reason(tmp_path, tok):
    bad = [
        {"messages": [user("Hello?")]},
        {"messages": [user("Hi."), assistant("Hello!"), assistant("Again.")]},
        {"messages": [user("Hi."), assistant("Hello!"), user(" "), assistant("x")]},
        {"messages": [user("Hi.")]},
    ]
    src = write_split(tmp_path / "src", "train.jsonl", [GOOD, *bad])
    write_split(tmp_path / "src", "eval.jsonl", [GOOD])
    data = build(config(tmp_path, src), tok)

    assert len(data.train) == 1 and len(data.eval) == 1
    assert spans_text(tok, data.train[0]) == [
        "2 plus 3 is 5.<|im_end|>",
        "The capital of France is Paris.<|im_end|>",
    ]
    stat = data.sources[0]
    assert stat.skipped_rows == 4
    assert stat.skip_reasons == {"no assistant turn": 2, "roles out of order": 1, "empty turn": 1}
    assert stat.skip_examples["empty turn"] == "turn 3 (user) is empty"
    cfg = parse_args(["--model_name_or_path", "m", "--data_split", "10,0,0"])
    (warning,) = data_warnings(cfg, data)
    assert f"{src}: 4 rows were skipped: 2 rows: no assistant turn (first: roles: ['user'])" in (
        warning
    )
    assert "1 row: roles out of order (first: turn 3 is assistant where user was expected" in (
        warning
    )


def test_rows_the_template_cannot_split_are_skipped_and_counted(tmp_path, tok):
    reasoning = {"messages": [user("Hi."), assistant("<think>greet</think>Hello!"), user("Bye."), assistant("Bye!")]}  # fmt: skip
    src = write_split(tmp_path / "src", "train.jsonl", [GOOD, reasoning])
    write_split(tmp_path / "src", "eval.jsonl", [GOOD])
    template = tmp_path / "qwen3-like.jinja"
    template.write_text(DROPS_REASONING)
    data = build(config(tmp_path, src, chat_template=str(template)), tok)
    assert len(data.train) == 1
    assert data.sources[0].skip_reasons == {"template cannot be split": 1}
    assert (
        "the turns after turn 2 change how it is rendered"
        in (data.sources[0].skip_examples["template cannot be split"])
    )


def test_a_source_whose_every_row_is_skipped_fails_with_the_reasons(tmp_path, tok):
    src = write_split(tmp_path / "src", "train.jsonl", [{"messages": [user("Hello?")]}] * 3)
    write_split(tmp_path / "src", "eval.jsonl", [GOOD])
    with pytest.raises(Exception, match="every training row was skipped: 3 rows: no assistant"):
        build(config(tmp_path, src), tok)


def test_hub_data_set_rows_lose_their_scaffolding_and_gain_the_system_prompt(tmp_path, tok):
    # A local copy of Dahoas/rm-static (its catalogue formatter), hh-style multi-exchange prompt.
    row = {
        "prompt": "\n\nHuman: What is 2 plus 3?\n\nAssistant: 2 plus 3 is 5.\n\n"
        "Human: What is the capital of France?\n\nAssistant:",
        "response": " The capital of France is Paris.",
        "chosen": " The capital of France is Paris.",
        "rejected": " Paris? No.",
    }
    folder = tmp_path / "Dahoas" / "rm-static"
    write_split(folder, "train.jsonl", [row])
    src = write_split(folder, "test.jsonl", [row])
    data = build(config(tmp_path, src, system_prompt="Be brief."), tok)
    (got,) = list(data.train)
    assert tok.decode(got["input_ids"]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n2 plus 3 is 5.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n"
    )
    assert spans_text(tok, got) == [
        "2 plus 3 is 5.<|im_end|>",
        "The capital of France is Paris.<|im_end|>",
    ]


def test_the_templates_text_and_system_prompt_key_the_cache(tmp_path, tok):
    src = write_split(tmp_path / "src", "train.jsonl", [GOOD] * 4)
    write_split(tmp_path / "src", "eval.jsonl", [GOOD])
    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE_PATH.read_text())
    build(config(tmp_path, src, chat_template=str(template)), tok)
    template.write_text("{#- edited -#}\n" + TEMPLATE_PATH.read_text())  # same name, new text
    build(config(tmp_path, src, chat_template=str(template)), tok)
    build(config(tmp_path, src, chat_template=str(template), system_prompt="Hi."), tok)
    build(config(tmp_path, src, chat_template="dschat"), tok)
    assert len(list((tmp_path / "cache").glob("sft-*[!k]"))) == 4


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory, tok):
    """Multi-turn demo conversations through the ChatML template, and the replies they hold."""
    tmp = tmp_path_factory.mktemp("demo")
    train, evaluation = build_chat_rows(seed=0)
    src = write_split(tmp / "src", "train.jsonl", train[:40])
    write_split(tmp / "src", "eval.jsonl", evaluation[:4])
    replies = Counter(
        m["content"] + "<|im_end|>"
        for row in train[:40]
        for m in row["messages"]
        if m["role"] == "assistant"
    )
    data = build(config(tmp, src), tok)
    assert data.sources[0].truncated_rows == 0  # every reply whole
    return data, replies


def trained_runs(tok, labels: torch.Tensor) -> list[str]:
    """The text of every run of trained positions in a [B, T] label tensor."""
    runs = []
    for row in labels.tolist():
        run: list[int] = []
        for label in [*row, IGNORE_INDEX]:
            if label != IGNORE_INDEX:
                run.append(label)
            elif run:
                runs.append(tok.decode(run))
                run = []
    return runs


@pytest.mark.parametrize("packing", [False, True], ids=["length-grouped", "packed"])
def test_every_assistant_turn_is_trained_once_per_epoch_and_nothing_else(demo_data, tok, packing):
    data, replies = demo_data
    loader = build_train_loader(
        data.train,
        BatchConfig(packing=packing, loss_on="response"),
        micro_batch=4,
        max_seq_len=512,
        pad_token_id=tok.pad_token_id,
        seed=3,
        rank=0,
        world_size=1,
        mask_dtype=torch.float32,
        on_gpu=False,
    )
    batches = list(loader)
    if packing:  # several conversations share a row, each with all of its spans
        assert any(len(pack) > 1 for pack in loader.dataset.packs)
    trained = Counter(run for batch in batches for run in trained_runs(tok, batch["labels"]))
    assert trained == replies


def test_loss_on_defaults_to_the_assistant_turns_with_a_template_and_an_explicit_value_wins():
    model = ["--model_name_or_path", "m"]
    assert parse_args(model).batch.loss_on == "all"
    assert parse_args([*model, "--chat_template", "model"]).batch.loss_on == "response"
    assert parse_args([*model, "--chat_template", "t.jinja", "--loss_on", "all"]).batch.loss_on == (
        "all"
    )
    assert parse_args([*model, "--loss_on", "response"]).batch.loss_on == "response"


def test_summary_names_the_template_and_the_share_the_spans_train(demo_data):
    data, _ = demo_data
    cfg = parse_args(["--model_name_or_path", "m", "--chat_template", CHATML])
    config = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
    }
    plan = StepPlan(micro_batches_per_epoch=5, accumulation=1, epochs=1)
    text = build_summary(cfg, data, (10, 10), summary_setup(config), plan)
    tokens = sum(len(ids) for ids in data.train["input_ids"])
    spans = sum(e - s for row in data.train["loss_spans"] for s, e in row)
    assert f"format       --chat_template {CHATML}: every assistant turn trained" in text
    assert f"loss on {100 * spans / tokens:.0f}% of them (assistant turns only)" in text
    assert 0 < spans < tokens


@pytest.mark.parametrize("loss_on", ["all", "response"])
def test_the_trained_token_count_is_what_the_labels_train(demo_data, loss_on):
    # check_trained_tokens refuses data whose count is 0; it must agree with the labels.
    data, _ = demo_data
    labels = [build_labels(row, loss_on)[1:] for row in data.train]  # after the shift
    expected = sum(label != IGNORE_INDEX for row in labels for label in row)
    assert trained_tokens(data.train, loss_on) == expected > 0
