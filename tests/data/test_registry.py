"""Every catalogue entry on a tiny copy in its exact hub schema, written to a folder named like it."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict

from utils.data.build import build_sft_data
from utils.data.common import DataError
from utils.data.config import DataConfig
from utils.data.formats import format_rows
from utils.data.registry import DATASETS
from utils.data.sources import load_source, resolve_source

WEBGPT_QUOTES = {"title": ["Sky"], "extract": ["Rayleigh scattering."]}


def shp(history, a, b, labels):
    return {
        "post_id": "p1",
        "domain": "askscience_train",
        "upvote_ratio": 0.9,
        "history": history,
        "c_root_id_A": "a",
        "c_root_id_B": "b",
        "created_at_utc_A": 1,
        "created_at_utc_B": 2,
        "score_A": 5,
        "score_B": 3,
        "human_ref_A": a,
        "human_ref_B": b,
        "labels": labels,
        "seconds_difference": 1.0,
        "score_ratio": 1.6,
    }


def mkqa(zh, ja, zh_answer, ja_answer):
    def answer(text):
        return [{"type": 5, "entity": "", "text": text, "aliases": []}]

    return {
        "example_id": 1,
        "query": "q",
        "queries": {"en": "q", "zh_cn": zh, "ja": ja},
        "answers": {"en": answer("a"), "zh_cn": answer(zh_answer), "ja": answer(ja_answer)},
    }


def miracl(query, positive, negative):
    return {
        "query_id": "1",
        "query": query,
        "positive_passages": [{"docid": "d1", "text": positive, "title": "t"}],
        "negative_passages": [{"docid": "d2", "text": negative, "title": "t"}],
    }


# name -> (hub split name -> rows, expected (prompt, response) of the train rows, eval split or None)
CASES = {
    "Dahoas/rm-static": (
        {
            "train": [
                {
                    "prompt": "\n\nHuman: Hi?\n\nAssistant:",
                    "response": " Hello.",
                    "chosen": " Hello.",
                    "rejected": " Go.",
                },
                {
                    "prompt": "\n\nHuman: Empty?\n\nAssistant:",
                    "response": "",
                    "chosen": "",
                    "rejected": " x",
                },
            ],
            "test": [
                {
                    "prompt": "\n\nHuman: Test?\n\nAssistant:",
                    "response": " T.",
                    "chosen": " T.",
                    "rejected": " N.",
                }
            ],
        },
        [("\n\nHuman: Hi?\n\nAssistant:", " Hello.")],
    ),
    "Dahoas/full-hh-rlhf": (
        {
            "train": [
                {
                    "prompt": "\n\nHuman: Why?\n\nAssistant:",
                    "response": " Because.",
                    "chosen": " Because.",
                    "rejected": " No.",
                }
            ],
            "test": [
                {
                    "prompt": "\n\nHuman: T?\n\nAssistant:",
                    "response": " T.",
                    "chosen": " T.",
                    "rejected": " N.",
                }
            ],
        },
        [("\n\nHuman: Why?\n\nAssistant:", " Because.")],
    ),
    "Dahoas/synthetic-instruct-gptj-pairwise": (
        {
            "train": [
                {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "A car."},
                {"prompt": None, "chosen": "x", "rejected": "y"},
            ]
        },
        [(" Human: Name a fruit. Assistant:", " An apple.")],
    ),
    "yitingxie/rlhf-reward-datasets": (
        {
            "train": [
                {
                    "prompt": "\n\nHuman: Hi?\n\n",
                    "chosen": "Assistant: Hello.",
                    "rejected": "Assistant: Bye.",
                }
            ],
            "test": [
                {
                    "prompt": "\n\nHuman: T?\n\n",
                    "chosen": "Assistant: T.",
                    "rejected": "Assistant: N.",
                }
            ],
        },
        [("\n\nHuman: Hi?\n\nAssistant:", " Hello.")],
    ),
    "openai/webgpt_comparisons": (
        {
            "train": [
                {
                    "question": {"dataset": "eli5", "id": "1", "full_text": "Why is the sky blue?"},
                    "quotes_0": WEBGPT_QUOTES,
                    "answer_0": "Scattering [1].",
                    "tokens_0": [],
                    "score_0": -1.0,
                    "quotes_1": WEBGPT_QUOTES,
                    "answer_1": "Rayleigh scattering [1][2] of light.",
                    "tokens_1": [],
                    "score_1": 1.0,
                },
                {
                    "question": {"dataset": "eli5", "id": "2", "full_text": "Tie?"},
                    "quotes_0": WEBGPT_QUOTES,
                    "answer_0": "First [3, 4].",
                    "tokens_0": [],
                    "score_0": 0.0,
                    "quotes_1": WEBGPT_QUOTES,
                    "answer_1": "Second.",
                    "tokens_1": [],
                    "score_1": 0.0,
                },
            ]
        },
        [
            (" Human: Why is the sky blue? Assistant:", " Rayleigh scattering of light."),
            (" Human: Tie? Assistant:", " First."),
        ],
    ),
    "stanfordnlp/SHP": (
        {
            "train": [shp("Why?", "Ref A.", "Ref B.", 1), shp("How?", "Worse.", "Better.", 0)],
            "validation": [shp("V?", "A.", "B.", 1)],
            "test": [shp("T?", "A.", "B.", 1)],
        },
        [(" Human: Why? Assistant:", " Ref A."), (" Human: How? Assistant:", " Better.")],
    ),
    "pvduy/sharegpt_alpaca_oa_vicuna_format": (
        {
            "train": [
                {
                    "prompt": "USER: Hi, USERS are here ASSISTANT: Hey USER: Bye ASSISTANT:",
                    "label": "Goodbye.",
                }
            ],
            "test": [{"prompt": "USER: T ASSISTANT:", "label": "T."}],
        },
        [(" Human: Hi, USERS are here Assistant: Hey Human: Bye Assistant:", " Goodbye.")],
    ),
    "wangrui6/Zhihu-KOL": (
        {
            "train": [
                {
                    "INSTRUCTION": "为什么?",
                    "RESPONSE": "因为。",
                    "SOURCE": "Zhihu",
                    "METADATA": "{}",
                }
            ]
        },
        [(" Human: 为什么? Assistant:", " 因为。")],
    ),
    "Cohere/miracl-zh-queries-22-12": (
        {"train": [miracl("天空?", "蓝色。", "绿色。")], "dev": [miracl("开发?", "是。", "否。")]},
        [(" Human: 天空? Assistant:", " 蓝色。")],
    ),
    "Cohere/miracl-ja-queries-22-12": (
        {
            "train": [
                miracl("空?", "青。", "緑。"),
                {**miracl("x", "y", "z"), "positive_passages": []},
            ],
            "dev": [miracl("開発?", "はい。", "いいえ。")],
        },
        [(" Human: 空? Assistant:", " 青。")],
    ),
    "Hello-SimpleAI/HC3-Chinese": (
        {
            "train": [
                {
                    "id": "0",
                    "question": "天空为什么是蓝的?",
                    "human_answers": ["散射。"],
                    "chatgpt_answers": ["因为散射。"],
                }
            ]
        },
        [(" Human: 天空为什么是蓝的? Assistant:", " 散射。")],
    ),
    "mkqa-Chinese": (
        {"train": [mkqa("天空?", "空?", "蓝色", "青")]},
        [(" Human: 天空? Assistant:", " 蓝色")],
    ),
    "mkqa-Japanese": (
        {"train": [mkqa("天空?", "空?", "蓝色", "青")]},
        [(" Human: 空? Assistant:", " 青")],
    ),
    "lmqg/qg_jaquad": (
        {
            "train": [
                {
                    "answer": "青",
                    "paragraph_question": "",
                    "question": "空の色は?",
                    "sentence": "空は青い。",
                    "paragraph": "空は青い。海も青い。",
                    "sentence_answer": "",
                    "paragraph_answer": "",
                    "paragraph_sentence": "",
                    "paragraph_id": "1",
                }
            ],
            "validation": [
                {
                    "answer": "",
                    "paragraph_question": "",
                    "question": "V?",
                    "sentence": "V。",
                    "paragraph": "",
                    "sentence_answer": "",
                    "paragraph_answer": "",
                    "paragraph_sentence": "",
                    "paragraph_id": "2",
                }
            ],
        },
        [(" Human: 空の色は? Assistant:", " 空は青い。")],
    ),
    "lmqg/qag_jaquad": (
        {
            "train": [
                {
                    "paragraph": "空は青い。",
                    "questions": ["空の色は?", "何?"],
                    "answers": ["青", "x"],
                    "paragraph_id": "1",
                    "questions_answers": "",
                }
            ],
            "validation": [
                {
                    "paragraph": "V。",
                    "questions": ["V?"],
                    "answers": ["v"],
                    "paragraph_id": "2",
                    "questions_answers": "",
                }
            ],
        },
        [(" Human: 空の色は? Assistant:", " 空は青い。")],
    ),
}


def write_hub_copy(folder, splits, layout):
    """The files a hub snapshot (data/<split>-00000-of-00001.<ext>) or save_to_disk would hold."""
    if layout == "saved":
        DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(folder))
        return
    (folder / "data").mkdir(parents=True)
    for split, rows in splits.items():
        path = folder / "data" / f"{split}-00000-of-00001.{layout}"
        if layout == "parquet":
            Dataset.from_list(rows).to_parquet(str(path))
        else:
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def formatted(name, folder, tmp_path):
    splits, formatter = load_source(resolve_source(str(folder)), str(tmp_path / "hf"))
    out = {}
    for part, rows in splits.items():
        rows, skipped = format_rows(rows, formatter, str(tmp_path / f"{part}.arrow"))
        out[part] = ([(r["prompt"], r["response"]) for r in rows], skipped)
    return out


def test_every_catalogue_entry_has_a_case():
    assert set(CASES) | {"local/jsonfile"} == set(DATASETS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapter_formats_its_hub_schema(tmp_path, name):
    splits, expected = CASES[name]
    layout = ("jsonl", "parquet", "saved")[sorted(CASES).index(name) % 3]
    folder = tmp_path / "copies" / name
    write_hub_copy(folder, splits, layout)

    out = formatted(name, folder, tmp_path)
    assert out["train"][0] == expected
    assert out["train"][1] == len(splits["train"]) - len(expected)  # skipped rows
    eval_split = DATASETS[name].eval_split
    assert ("eval" in out) == (eval_split is not None)
    if eval_split:
        assert len(out["eval"][0]) == len(splits[eval_split])


def test_local_jsonfile_reads_data_train_and_eval_json(tmp_path, monkeypatch, tiny_tokenizer):
    rows = [
        {"prompt": f" Human: Q{i}? Assistant:", "chosen": f" A{i}.", "rejected": " No."}
        for i in range(4)
    ]
    (tmp_path / "data").mkdir()
    (tmp_path / "data/train.json").write_text(json.dumps(rows[:3]))
    (tmp_path / "data/eval.json").write_text(json.dumps(rows[3:]))
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(data_path=["local/jsonfile"], data_split="10,0,0", data_output_path="cache")
    data = build_sft_data(cfg, tiny_tokenizer, None)
    assert (len(data.train), len(data.eval)) == (3, 1)
    assert (
        tiny_tokenizer.decode(data.eval[0]["input_ids"])
        == "</s> Human: Q3? Assistant: A3.<|endoftext|>"
    )


def test_train_only_hub_copy_gets_a_seeded_nine_to_one_eval_cut(tmp_path, tiny_tokenizer):
    folder = tmp_path / "wangrui6" / "Zhihu-KOL"
    rows = [
        {"INSTRUCTION": f"Q{i}?", "RESPONSE": f"A{i}.", "SOURCE": "", "METADATA": ""}
        for i in range(20)
    ]
    # A stray test file is ignored: the hub data set has train only.
    write_hub_copy(folder, {"train": rows, "test": rows[:5]}, "jsonl")
    cfg = DataConfig(
        data_path=[str(folder)], data_split="10,0,0", data_output_path=str(tmp_path / "cache")
    )
    data = build_sft_data(cfg, tiny_tokenizer, None)
    assert (len(data.train), len(data.eval)) == (18, 2)
    train = {tiny_tokenizer.decode(r["input_ids"]) for r in data.train}
    assert not train & {tiny_tokenizer.decode(r["input_ids"]) for r in data.eval}


def test_hub_name_offline_says_how_to_use_a_local_copy(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(data_path=["Dahoas/rm-static"], data_output_path=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"--data_path DIR/Dahoas/rm-static") as err:
        build_sft_data(cfg, tiny_tokenizer, None)
    assert "save_to_disk" in str(err.value)


def test_offline_hint_for_a_shared_hub_set_names_the_catalogue_entry(tmp_path, tiny_tokenizer):
    cfg = DataConfig(data_path=["mkqa-Japanese"], data_output_path=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"load_dataset\('mkqa'\).*--data_path DIR/mkqa-Japanese"):
        build_sft_data(cfg, tiny_tokenizer, None)
