"""Every plausible mistake ends in one clear line and exit 2, before any expensive work
(issue 15, item 1). Each case is a mistake a new user made; before the fix it trained
anyway, ended in a traceback, or blamed the wrong flag.

Most cases stop in validation (no data, no weights read); the data cases run --dry_run,
which builds the (tiny) data but never the engine.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import typing
from dataclasses import fields
from pathlib import Path

import pytest
from datasets.arrow_writer import ArrowWriter

import main as cli
from prompt_eval import run as prompt_eval
from tests.conftest import CORPUS, REPO
from utils.cli.parse import parse_args
from utils.cli.validate import float_problems

PAIR = {"prompt": " Human: What is 2 plus 3? Assistant:", "chosen": " 2 plus 3 is 5."}
needs_proc = pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux's /proc")


def write_set(folder: Path, rows: list[dict], raw_line: bytes = b"") -> str:
    """A train/eval folder of `rows` (JSON lines); `raw_line` is appended to train as is."""
    folder.mkdir(parents=True)
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (folder / "train.jsonl").write_bytes(body + raw_line)
    (folder / "eval.jsonl").write_bytes(body)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir, tiny_tokenizer) -> dict[str, str]:
    """The tiny model folder, and broken copies of it as users end up with them."""
    from utils.demo.tiny import build_tokenizer

    root = tmp_path_factory.mktemp("models")
    made = {"good": str(tiny_model_dir)}
    for name in ("no_tokenizer", "truncated", "garbage", "no_weights", "missing_shard"):
        shutil.copytree(tiny_model_dir, root / name)
        made[name] = str(root / name)
    for file in (root / "no_tokenizer").glob("tokenizer*"):
        file.unlink()
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    (root / "garbage" / "model.safetensors").write_bytes(os.urandom(5000))
    (root / "no_weights" / "model.safetensors").unlink()
    shard = root / "missing_shard"
    (shard / "model.safetensors").rename(shard / "model-00001-of-00002.safetensors")
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    # Another model's tokenizer: 300 tokens for the model's 400 embedding rows.
    build_tokenizer(CORPUS, vocab_size=300).save_pretrained(root / "other_tokenizer")
    made["other_tokenizer"] = str(root / "other_tokenizer")
    return made


@pytest.fixture
def data(tmp_path) -> str:
    return write_set(tmp_path / "data", [PAIR] * 16)


def run_main(capsys, model: str, data_path: list[str], tmp_path: Path, *extra: str):
    """main.py's exit status and its error message (exactly one line of it), or its
    stdout when it succeeds."""
    argv = [
        "--model_name_or_path", model,
        "--data_path", *data_path,
        "--data_split", "10,0,0",
        "--data_output_path", str(tmp_path / "cache"),
        "--max_seq_len", "32",
        *extra,
    ]  # fmt: skip
    if "--output_dir" not in extra:
        argv.append("--dry_run")
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, one_line(captured.err) if code else captured.out


def one_line(err: str) -> str:
    """The single problem reported: `error: <it>`, or one `  - <it>` under 'invalid arguments'."""
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    if errors[0] == "error: invalid arguments:":
        assert len(problems) == 1, err[-3000:]
        return problems[0]
    return errors[0]


# Validation: the model folder, the numbers, the folders -----------------------------------


@pytest.mark.parametrize(
    ("model", "extra", "expected"),
    [
        ("no_tokenizer", [], "has no usable tokenizer"),
        (
            "good",
            ["--tokenizer_name_or_path", "other_tokenizer"],
            "it is not this model's tokenizer",
        ),
        ("truncated", [], "truncated/model.safetensors is not a readable safetensors file"),
        ("garbage", [], "garbage/model.safetensors is not a readable safetensors file"),
        ("no_weights", [], "holds no weights (none of model.safetensors"),
        ("missing_shard", [], "model-00002-of-00002.safetensors is missing"),
    ],
)
def test_a_broken_model_folder_is_named_before_any_work(
    capsys, tmp_path, models, data, model, extra, expected
):
    # Before: no tokenizer trained on one token per row to perplexity 1.0, and broken
    # weights passed validation and the data build, then ended in a library traceback.
    extra = [models.get(e, e) for e in extra]
    code, message = run_main(capsys, models[model], [data], tmp_path, *extra)
    assert code == 2 and expected in message
    assert not (tmp_path / "cache").exists()  # refused before the data was built


def test_a_model_folder_without_a_tokenizer_trains_with_tokenizer_name_or_path(
    capsys, tmp_path, models, data
):
    extra = ("--tokenizer_name_or_path", models["good"])
    code, out = run_main(capsys, models["no_tokenizer"], [data], tmp_path, *extra)
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["train_tokens"] > 16 * 5  # real tokens, not one per row


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--learning_rate", "nan"], "--learning_rate nan is not a finite number"),
        (["--learning_rate", "-0.001"], "--learning_rate -0.001 must be above 0"),
        (["--weight_decay", "nan"], "--weight_decay nan is not a finite number"),
        (["--weight_decay", "-0.1"], "--weight_decay -0.1 must be 0 or more"),
        (["--lora_learning_rate=-1"], "--lora_learning_rate -1.0 must be above 0"),
        (["--dropout", "nan"], "--dropout nan is not a finite number"),
        (["--dropout", "1.5"], "--dropout 1.5 must be below 1"),
        (["--gpu_memory_gb", "inf"], "--gpu_memory_gb inf is not a finite number"),
        (["--peak_tflops", "-1"], "--peak_tflops -1.0 must be above 0"),
        (["--seed", "-1"], "--seed -1: must be between 0 and 4294967295"),
        (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size 0 must be at"),
        (["--data_split", "1,2"], "--data_split '1,2': give 3 comma-separated weights"),
        (["--disk_full_wait_minutes", "-1"], "--disk_full_wait_minutes -1 must be between 0"),
        (["--dataloader_num_workers", "-1"], "--dataloader_num_workers -1 must be 0 or more"),
    ],
)
def test_a_number_that_makes_no_sense_is_refused(capsys, tmp_path, models, data, flags, expected):
    # Before: every float flag but --dropout and --learning_rate <= 0 went unchecked (a NaN
    # learning rate trained NaN weights); --seed -1 was a numpy ValueError mid-build.
    code, message = run_main(capsys, models["good"], [data], tmp_path, *flags)
    assert code == 2 and expected in message


def test_every_float_flag_is_checked_for_nan():
    # The rule comes from the fields' types: a float flag added later is covered too.
    cfg = parse_args(["--model_name_or_path", "m"])
    floats = []
    for group in fields(cfg):
        settings = getattr(cfg, group.name)
        hints = typing.get_type_hints(type(settings))
        for f in fields(settings):
            kind = hints[f.name]
            if float in (typing.get_args(kind) or (kind,)):
                setattr(settings, f.name, math.nan)
                floats.append(f.name)
    assert len(floats) >= 6  # learning_rate, weight_decay, dropout, lora lr, gpu GB, peak
    problems = "\n".join(float_problems(cfg))
    assert all(f"--{name} nan is not a finite number" in problems for name in floats)


@needs_proc
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--output_dir", "/proc/sft-out"], "--output_dir '/proc/sft-out' cannot be created"),
        (
            ["--output_dir", "{tmp}/out", "--enable_tensorboard", "--tensorboard_path", "/proc/tb"],
            "--tensorboard_path '/proc/tb' cannot be created",
        ),
        (
            ["--output_dir", "{tmp}/out", "--data_output_path", "/proc/cache"],
            "--data_output_path '/proc/cache' cannot be created",
        ),
    ],
)
def test_a_folder_the_process_cannot_create_is_named(
    capsys, tmp_path, models, data, flags, expected
):
    # Before: os.access said yes (always, to root), and the run trained, then died in a
    # FileNotFoundError traceback when it first wrote there.
    flags = [f.format(tmp=tmp_path) for f in flags]
    code, message = run_main(capsys, models["good"], [data], tmp_path, "--max_steps", "1", *flags)
    assert code == 2 and expected in message
    assert not (tmp_path / "out").exists()


# Data ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spellings",
    [
        ["{d}", "{d}"],
        ["{d}", "{d}/../data/"],
        ["{d}", "{link}"],
        ["{d}", "{d}/train.jsonl"],
        ["{d}:0.5", "{d}:0.5"],
    ],
)
def test_a_data_source_given_twice_is_refused(capsys, tmp_path, models, data, spellings):
    # Before: every row trained twice without a word. Refused (not deduplicated): the
    # user decides which copy and weight; NAME:2 trains a source twice on purpose.
    os.symlink(data, tmp_path / "link")
    paths = [s.format(d=data, link=tmp_path / "link") for s in spellings]
    code, message = run_main(capsys, models["good"], paths, tmp_path)
    assert code == 2 and "rows would train twice" in message and f"write {data}" in message


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"prompt": None, "chosen": " A."}], "because in every row 'prompt' is null"),
        (
            [{"prompt": " Human: Q? Assistant:", "response": " "}],
            "because in every row 'response' is empty",
        ),
        (
            [
                {
                    "prompt": " Human: Q?",
                    "chosen": [{"role": "assistant", "content": "A."}],
                    "rejected": [{"role": "assistant", "content": "B."}],
                }
            ],
            "because in every row 'chosen' is a list of chat turns, not text",
        ),
        (
            [{"messages": [{"role": "user", "content": "Q?"}]}],
            "because in every row 'messages' has no assistant turn after the first turn",
        ),
    ],
)
def test_a_file_of_unusable_rows_says_all_were_skipped_and_why(
    capsys, tmp_path, models, rows, expected
):
    # Before: "no eval rows ... raise the first --data_split weight", the wrong flag.
    folder = write_set(tmp_path / "bad", rows * 8)
    code, message = run_main(capsys, models["good"], [folder], tmp_path)
    assert code == 2 and f"all 8 rows of {folder}/train.jsonl were skipped" in message
    assert expected in message
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # no entry, no .build-


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_data_line_that_is_not_utf8_is_named(capsys, tmp_path, models, suffix):
    # Before: a UnicodeDecodeError traceback (JSON) or the decoder's byte offset (CSV).
    path = tmp_path / f"rows{suffix}"
    if suffix == ".csv":
        path.write_bytes(b'prompt,chosen\n"Q?","A."\n"caf\xe9?","B."\n')
    else:
        path.write_bytes((json.dumps(PAIR) + "\n").encode() * 2 + b'{"prompt": "caf\xe9?"}\n')
    code, message = run_main(capsys, models["good"], [str(path)], tmp_path)
    assert code == 2 and f"{path}:3: not UTF-8 text (byte 0xe9" in message


def test_a_prompts_line_that_is_not_utf8_is_named(capsys, tmp_path, models):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"Say hello.\nCaf\xe9 or tea?\n")
    code = prompt_eval(
        ["--model_name_or_path_baseline", models["good"],
         "--model_name_or_path_finetune", models["good"], "--prompts", str(prompts)]
    )  # fmt: skip
    assert code == 2
    assert f"--prompts {prompts}: line 2 is not UTF-8 text" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("baseline", "expected"),
    [
        ("truncated", "model.safetensors is not a readable safetensors file"),
        ("no_tokenizer", "no_tokenizer has no usable tokenizer"),
    ],
)
def test_prompt_eval_names_a_broken_model_folder(capsys, models, baseline, expected):
    # Before: a safetensors traceback, or answers from a tokenizer with no vocabulary.
    code = prompt_eval(
        ["--model_name_or_path_baseline", models[baseline],
         "--model_name_or_path_finetune", models["good"], "--max_new_tokens", "2"]
    )  # fmt: skip
    assert code == 2 and expected in one_line(capsys.readouterr().err)


def test_data_whose_responses_are_all_cut_away_is_refused(capsys, tmp_path, models):
    # Before: --loss_on response trained on zero tokens and reported perplexity 1.0.
    long_prompt = {"prompt": " Human:" + " What is 2 plus 3?" * 10 + " Assistant:", "chosen": " 5."}
    folder = write_set(tmp_path / "long", [long_prompt] * 8)
    code, message = run_main(capsys, models["good"], [folder], tmp_path, "--loss_on", "response")
    assert code == 2 and "give the loss no token" in message and "Raise --max_seq_len" in message


# Faults (issue 21) ---------------------------------------------------------------------


def test_a_full_disk_under_the_data_cache_names_the_cache_folder(
    capsys, tmp_path, models, data, monkeypatch
):
    # Before: "cannot read ['.../train.jsonl']: [Errno 28] No space left on device", as if
    # the input were at fault, and a traceback when the disk filled later in the build.
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ArrowWriter, "_write_table", full)
    code, message = run_main(capsys, models["good"], [data], tmp_path)
    cache = tmp_path / "cache"
    assert code == 2
    assert f"no room for the tokenised-data cache in --data_output_path {cache}" in message
    assert not [p for p in cache.iterdir() if p.is_dir()]  # no entry, no .build- folder


def test_a_checkpoint_folder_others_can_write_is_refused(capsys, tmp_path, models, data):
    # Before: DeepSpeed unpickled its files as they were; code planted there ran as the user.
    checkpoint = tmp_path / "out" / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    (checkpoint / "run_state.json").write_text("{}")
    os.chmod(checkpoint, 0o777)
    resume = ["--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", "auto"]
    code, message = run_main(capsys, models["good"], [data], tmp_path, *resume)
    assert code == 2 and f"checkpoint {checkpoint} could run another user's code" in message
    assert f"{checkpoint} is writable by every user (mode 0777)" in message


# Launchers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["out", "5"], "ZERO_STAGE (the second argument) is '5'"),
        (["--max_steps", "3"], "OUTPUT (the first argument) is '--max_steps', a flag"),
    ],
)
def test_run_tiny_names_the_bad_argument_before_building_the_demo(tmp_path, args, expected):
    # Before: it built the demo, then main.py's argparse dumped its usage.
    env = dict(os.environ, EMBEDDED=str(tmp_path / "embedded"))
    result = subprocess.run(
        ["bash", str(REPO / "training_scripts/opt/cpu/run_tiny.sh"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {expected}") and "usage: bash" in result.stderr
    assert not (tmp_path / "embedded").exists()
