"""The SFT data chain end to end on local folders: exact ids, split, blend, truncation."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO
from utils.data.build import build_sft_data
from utils.data.config import DataConfig

EOT = "<|endoftext|>"


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pair(i, answer=None):
    return {
        "prompt": f" Human: What is {i} plus {i}? Assistant:",
        "chosen": answer or f" It is {2 * i}.",
    }


def make_source(folder, n_train, n_eval, offset=0):
    write_jsonl(folder / "train.jsonl", [pair(offset + i) for i in range(n_train)])
    write_jsonl(folder / "eval.jsonl", [pair(offset + 1000 + i) for i in range(n_eval)])
    return str(folder)


def config(tmp_path, data_path, **kw):
    kw.setdefault("data_split", "10,0,0")
    kw.setdefault("max_seq_len", 128)
    return DataConfig(data_path=data_path, data_output_path=str(tmp_path / "cache"), **kw)


def expected_ids(tok, prompt, response, max_len=10**9):
    """The row's ids and its one loss span: the response (with eot), after the prompt."""
    p = tok(prompt)["input_ids"]
    ids = p + tok(response + EOT, add_special_tokens=False)["input_ids"]
    return ids[:max_len], [[min(len(p), max_len), min(len(ids), max_len)]]


def decoded_rows(tok, data):
    return sorted(tok.decode(r["input_ids"]) for r in data)


def test_rows_are_prompt_tokens_then_response_tokens_then_eot(tmp_path, tiny_tokenizer):
    src = make_source(tmp_path / "src", 6, 3)
    data = build_sft_data(config(tmp_path, [src]), tiny_tokenizer, None)

    assert data.train.column_names == ["input_ids", "loss_spans"]
    expected = {}
    for i in range(6):
        ids, spans = expected_ids(tiny_tokenizer, pair(i)["prompt"], pair(i)["chosen"])
        expected[tuple(ids)] = spans
    got = {tuple(r["input_ids"]): r["loss_spans"] for r in data.train}
    assert got == expected
    first = data.train[0]["input_ids"]
    assert first[0] == tiny_tokenizer.bos_token_id
    assert first[-1] == tiny_tokenizer.convert_tokens_to_ids(EOT)
    assert len(data.eval) == 3
    assert data.sources[0].train_rows == 6 and data.sources[0].eval_rows == 3
    assert data.train_tokens == sum(len(ids) for ids in expected)


def test_long_rows_are_cut_on_the_right_and_counted(tmp_path, tiny_tokenizer):
    long_answer = " The sky is blue." * 20
    short = [pair(2), pair(3)]
    max_len = max(len(expected_ids(tiny_tokenizer, r["prompt"], r["chosen"])[0]) for r in short)
    write_jsonl(tmp_path / "src/train.jsonl", [pair(1, long_answer), short[0]])
    write_jsonl(tmp_path / "src/eval.jsonl", [short[1]])
    cfg = config(tmp_path, [str(tmp_path / "src")], max_seq_len=max_len)
    data = build_sft_data(cfg, tiny_tokenizer, None)

    cut, spans = expected_ids(tiny_tokenizer, pair(1)["prompt"], long_answer, max_len)
    assert {"input_ids": cut, "loss_spans": spans} in list(data.train)
    assert data.sources[0].truncated_rows == 1


def test_no_loss_span_when_the_prompt_alone_fills_the_row(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "src/train.jsonl", [pair(1)])
    write_jsonl(tmp_path / "src/eval.jsonl", [pair(2)])
    data = build_sft_data(
        config(tmp_path, [str(tmp_path / "src")], max_seq_len=4), tiny_tokenizer, None
    )
    assert data.train[0] == {
        "input_ids": tiny_tokenizer(pair(1)["prompt"])["input_ids"][:4],
        "loss_spans": [],
    }


def test_phase_one_takes_the_first_data_split_share_of_train_and_eval(tmp_path, tiny_tokenizer):
    src = make_source(tmp_path / "src", 11, 7)
    data = build_sft_data(config(tmp_path, [src], data_split="2,4,4"), tiny_tokenizer, None)
    # DeepSpeed-Chat's cuts: 11 rows -> 4.4 -> 4 twice, phase 1 gets 3; 7 rows -> 2.8 -> 3 twice, 1
    assert (len(data.train), len(data.eval)) == (3, 1)
    again = build_sft_data(
        config(tmp_path / "other", [src], data_split="2,4,4"), tiny_tokenizer, None
    )
    assert decoded_rows(tiny_tokenizer, again.train) == decoded_rows(tiny_tokenizer, data.train)


def test_data_split_10_0_0_uses_every_row(tmp_path, tiny_tokenizer):
    src = make_source(tmp_path / "src", 9, 4)
    data = build_sft_data(config(tmp_path, [src], data_split="10,0,0"), tiny_tokenizer, None)
    assert (len(data.train), len(data.eval)) == (9, 4)


def test_a_different_seed_picks_different_rows(tmp_path, tiny_tokenizer):
    src = make_source(tmp_path / "src", 40, 4)
    picks = [
        decoded_rows(
            tiny_tokenizer,
            build_sft_data(
                config(tmp_path, [src], data_split="1,1,2", seed=seed), tiny_tokenizer, None
            ).train,
        )
        for seed in (1, 2)
    ]
    assert len(picks[0]) == len(picks[1]) == 10
    assert picks[0] != picks[1]


def test_sources_are_concatenated_and_shuffled_with_the_seed(tmp_path, tiny_tokenizer):
    a = make_source(tmp_path / "a", 20, 2, offset=0)
    b = make_source(tmp_path / "b", 20, 3, offset=100)
    data = build_sft_data(config(tmp_path, [a, b]), tiny_tokenizer, None)

    assert [(s.name, s.train_rows, s.eval_rows) for s in data.sources] == [(a, 20, 2), (b, 20, 3)]
    assert (len(data.train), len(data.eval)) == (40, 5)
    numbers = [
        re.search(r"What is (\d+)", tiny_tokenizer.decode(r["input_ids"])) for r in data.train
    ]
    origin = ["b" if int(m.group(1)) >= 100 else "a" for m in numbers]
    assert origin.count("b") == 20
    assert origin != sorted(origin)  # interleaved, not source a then source b
    again = build_sft_data(config(tmp_path / "again", [a, b]), tiny_tokenizer, None)
    assert [r["input_ids"] for r in again.train] == [r["input_ids"] for r in data.train]


@pytest.mark.parametrize("split", ["2,4,4", "10,0,0"])
def test_train_tokens_add_up_over_sources(tmp_path, tiny_tokenizer, split):
    a = make_source(tmp_path / "a", 10, 5)
    b = make_source(tmp_path / "b", 10, 5, offset=50)
    data = build_sft_data(config(tmp_path, [a, b], data_split=split), tiny_tokenizer, None)
    assert data.train_tokens == sum(len(r["input_ids"]) for r in data.train)


def test_the_data_layer_imports_without_deepspeed():
    code = "import sys, utils.data; print(any(m.startswith('deepspeed') for m in sys.modules))"
    repo = str(REPO)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
