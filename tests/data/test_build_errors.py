"""Bad input fails before training with one clear message naming the input and the fix."""

from __future__ import annotations

import json

import pytest

from utils.data.build import build_sft_data, check_data_config
from utils.data.common import DataError
from utils.data.config import DataConfig
from utils.errors import UserError

PAIR = {"prompt": " Human: Q? Assistant:", "chosen": " A."}


def write_folder(folder, train, eval_rows=(PAIR,)):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    return str(folder)


def build(tmp_path, tok, data_path, **kw):
    kw.setdefault("data_split", "10,0,0")
    cfg = DataConfig(data_path=data_path, data_output_path=str(tmp_path / "cache"), **kw)
    return build_sft_data(cfg, tok, None)


def test_data_errors_are_user_errors():
    assert issubclass(DataError, UserError)


def test_unknown_name_lists_the_catalogue_and_the_local_option(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError) as err:
        build(tmp_path, tiny_tokenizer, ["Dahoas/rm-statik"])
    message = str(err.value)
    assert "'Dahoas/rm-statik'" in message
    assert "Dahoas/rm-static" in message and "stanfordnlp/SHP" in message
    assert "local .json/.jsonl/.csv/.parquet file" in message


def test_missing_file_is_named(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"'\./nope\.jsonl' does not exist"):
        build(tmp_path, tiny_tokenizer, ["./nope.jsonl"])


def test_malformed_json_line_names_file_and_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(PAIR) + "\n" + json.dumps(PAIR) + '\n{"prompt": "x",\n')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON line"):
        build(tmp_path, tiny_tokenizer, [str(path)])


def test_malformed_json_array_names_file_and_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "rows.json"
    path.write_text('[\n{"prompt": "a", "chosen": "b"},\n{"prompt": "a" "chosen": "b"}\n]')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        build(tmp_path, tiny_tokenizer, [str(path)])


def test_unrecognised_columns_are_listed(tmp_path, tiny_tokenizer):
    folder = write_folder(
        tmp_path / "set", [{"question": "q", "answer": "a"}], [{"question": "q", "answer": "a"}]
    )
    with pytest.raises(
        DataError, match=r"found \['answer', 'question'\]. Expected one of: messages"
    ):
        build(tmp_path, tiny_tokenizer, [folder])


def test_hub_copy_missing_a_column_names_columns_found_and_needed(tmp_path, tiny_tokenizer):
    folder = write_folder(tmp_path / "copies/Dahoas/rm-static", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(
        DataError, match=r"missing column\(s\) \['chosen'\]; found \['prompt', 'answer'\]"
    ):
        build(tmp_path, tiny_tokenizer, [folder])


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["{src}:heavy"], r"weight 'heavy' is not a number"),
        (["{src}:-1"], r"weight must be a finite number >= 0"),
        (["{src}:0"], r"data weights sum to 0"),
    ],
)
def test_bad_weights(tmp_path, tiny_tokenizer, specs, message):
    src = write_folder(tmp_path / "set", [PAIR])
    with pytest.raises(DataError, match=message):
        build(tmp_path, tiny_tokenizer, [s.format(src=src) for s in specs])


@pytest.mark.parametrize("split", ["2,4", "a,b,c", "0,0,0", "-1,5,5"])
def test_bad_data_split(tmp_path, tiny_tokenizer, split):
    src = write_folder(tmp_path / "set", [PAIR])
    with pytest.raises(DataError, match=rf"--data_split '{split}'"):
        build(tmp_path, tiny_tokenizer, [src], data_split=split)


def test_every_problem_is_reported_at_once(tmp_path):
    cfg = DataConfig(data_path=["nope/nothing", "./missing.csv"], data_split="1,2", max_seq_len=0)
    problems = check_data_config(cfg)
    text = "\n".join(problems)
    for fragment in (
        "--data_split '1,2'",
        "'nope/nothing'",
        "'./missing.csv' does not exist",
        "--max_seq_len 0",
    ):
        assert fragment in text


def test_an_empty_phase_one_partition_names_the_data_set(tmp_path, tiny_tokenizer):
    src = write_folder(tmp_path / "small", [PAIR, PAIR], [PAIR] * 10)
    with pytest.raises(DataError, match=r"small: no training rows for SFT"):
        build(tmp_path, tiny_tokenizer, [src], data_split="1,4,5")


def test_no_eval_rows_at_all_is_an_error(tmp_path, tiny_tokenizer):
    # 2 eval rows: phases 2 and 3 take round(0.8) = 1 each, phase 1 none.
    src = write_folder(tmp_path / "set", [PAIR] * 10, [PAIR] * 2)
    with pytest.raises(DataError, match=r"no eval rows"):
        build(tmp_path, tiny_tokenizer, [src], data_split="2,4,4")


def test_a_folder_without_a_train_file_says_how_to_name_files(tmp_path, tiny_tokenizer):
    (tmp_path / "set").mkdir()
    (tmp_path / "set/stuff.jsonl").write_text(json.dumps(PAIR) + "\n")
    with pytest.raises(DataError, match=r"no train split; found \['stuff'\]"):
        build(tmp_path, tiny_tokenizer, [str(tmp_path / "set")])
