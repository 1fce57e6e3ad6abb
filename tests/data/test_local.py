"""Local data: every file format, folder layout and recognised column shape."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict

from utils.data.formats import format_rows
from utils.data.sources import load_source, resolve_source

ROWS = [
    {"prompt": f" Human: Q{i}? Assistant:", "chosen": f" A{i}.", "rejected": " No."}
    for i in range(3)
]
EXPECTED = [(f" Human: Q{i}? Assistant:", f" A{i}.") for i in range(3)]


def write(path, rows, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        Dataset.from_list(rows).to_csv(str(path), index=False)
    elif fmt == "parquet":
        Dataset.from_list(rows).to_parquet(str(path))
    return path


def load(path, tmp_path):
    """{split: [(prompt, response), ...]} as the pipeline formats a local path."""
    splits, formatter = load_source(resolve_source(str(path)), str(tmp_path / "hf"))
    out = {}
    for part, rows in splits.items():
        rows, _ = format_rows(rows, formatter, str(tmp_path / f"{part}.arrow"))
        out[part] = [(r["prompt"], r["response"]) for r in rows]
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_a_single_file_is_all_train_rows(tmp_path, fmt):
    path = write(tmp_path / f"pairs.{fmt}", ROWS, fmt)
    assert load(path, tmp_path) == {"train": EXPECTED}


@pytest.mark.parametrize("eval_name", ["eval", "validation", "test", "dev"])
def test_a_folder_pairs_train_with_its_eval_file(tmp_path, eval_name):
    write(tmp_path / "set/train.jsonl", ROWS[:2], "jsonl")
    write(tmp_path / f"set/{eval_name}.jsonl", ROWS[2:], "jsonl")
    assert load(tmp_path / "set", tmp_path) == {"train": EXPECTED[:2], "eval": EXPECTED[2:]}


def test_a_folder_in_hub_layout_joins_the_shards_of_a_split(tmp_path):
    write(tmp_path / "set/data/train-00000-of-00002.parquet", ROWS[:1], "parquet")
    write(tmp_path / "set/data/train-00001-of-00002.parquet", ROWS[1:2], "parquet")
    write(tmp_path / "set/data/test-00000-of-00001.parquet", ROWS[2:], "parquet")
    assert load(tmp_path / "set", tmp_path) == {"train": EXPECTED[:2], "eval": EXPECTED[2:]}


def test_save_to_disk_folders_dict_and_single(tmp_path):
    DatasetDict(
        {"train": Dataset.from_list(ROWS[:2]), "validation": Dataset.from_list(ROWS[2:])}
    ).save_to_disk(str(tmp_path / "dict"))
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    assert load(tmp_path / "dict", tmp_path) == {"train": EXPECTED[:2], "eval": EXPECTED[2:]}
    assert load(tmp_path / "single", tmp_path) == {"train": EXPECTED}


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": " Human: Hi Assistant:", "response": " Yo"}, (" Human: Hi Assistant:", " Yo")),
        ({"prompt": "Q: 2+2?\nA:", "completion": " 4"}, ("Q: 2+2?\nA:", " 4")),
        (
            {"instruction": "Add.", "input": "2 and 2", "output": "4"},
            (" Human: Add.\n\n2 and 2 Assistant:", " 4"),
        ),
        (
            {"instruction": "Say hi.", "input": "", "output": "Hi"},
            (" Human: Say hi. Assistant:", " Hi"),
        ),
        (
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Bye"},
                    {"role": "assistant", "content": "Goodbye"},
                ]
            },
            (" System: Be brief. Human: Hi Assistant: Hello Human: Bye Assistant:", " Goodbye"),
        ),
        (
            {
                "conversations": [
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello"},
                ]
            },
            (" Human: Hi Assistant:", " Hello"),
        ),
    ],
    ids=[
        "prompt-response",
        "prompt-completion",
        "alpaca",
        "alpaca-no-input",
        "messages",
        "sharegpt",
    ],
)
def test_column_shapes(tmp_path, row, expected):
    path = write(tmp_path / "rows.jsonl", [row], "jsonl")
    assert load(path, tmp_path) == {"train": [expected]}


def test_conversations_without_a_final_answer_are_skipped(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "assistant", "content": "Unprompted"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
    ]
    path = write(tmp_path / "rows.jsonl", rows, "jsonl")
    splits, formatter = load_source(resolve_source(str(path)), str(tmp_path / "hf"))
    formatted, skipped = format_rows(splits["train"], formatter, str(tmp_path / "f.arrow"))
    assert (len(formatted), skipped) == (1, 3)


def test_rows_with_missing_or_empty_fields_are_skipped_and_counted(tmp_path):
    rows = [
        *ROWS,
        {"prompt": " Human: Q? Assistant:", "chosen": ""},
        {"prompt": None, "chosen": " A"},
    ]
    path = write(tmp_path / "rows.jsonl", rows, "jsonl")
    splits, formatter = load_source(resolve_source(str(path)), str(tmp_path / "hf"))
    formatted, skipped = format_rows(splits["train"], formatter, str(tmp_path / "f.arrow"))
    assert [(r["prompt"], r["response"]) for r in formatted] == EXPECTED
    assert skipped == 2
