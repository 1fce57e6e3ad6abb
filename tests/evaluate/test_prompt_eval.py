"""prompt_eval: baseline-versus-finetuned comparison on two tiny models built here.

The fine-tuned model is trained for a few plain-PyTorch steps to answer five
questions and then emit the end-of-conversation token, so "did it learn" and
"does generation stop at the token" have exact expected answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prompt_eval import run
from tests.conftest import CORPUS, REPO
from utils.data.collate import collate
from utils.demo.tiny import EOT, build_opt_model, build_tokenizer
from utils.evaluate.generation import (
    DecodingConfig,
    build_generate_kwargs,
    generate_answers,
    load_eval_model,
    load_eval_tokenizer,
)
from utils.evaluate.perplexity import compute_perplexity
from utils.evaluate.prompts import frame_prompt, load_prompts
from utils.evaluate.report import render_markdown

# (prompt, answer) pairs the fine-tuned model learns: " Human: Say hello. Assistant:" -> "Hello! ..."
PAIRS = [
    (question + " Assistant:", answer.strip())
    for question, answer in (line.split(" Assistant:") for line in dict.fromkeys(CORPUS))
]
PROMPTS = [prompt for prompt, _ in PAIRS]
ANSWERS = [answer for _, answer in PAIRS]


def sft_rows(tokenizer) -> list[dict]:
    """The data-layer row contract: prompt tokens (with BOS), then answer + eot."""
    rows = []
    for prompt, answer in PAIRS:
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = tokenizer(" " + answer + EOT, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + answer_ids
        rows.append({"input_ids": ids, "loss_spans": [[len(prompt_ids), len(ids)]]})
    return rows


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory, tiny_tokenizer):
    """Untrained, saved with dropout on: evaluation must switch it off to be deterministic."""
    model = build_opt_model(tiny_tokenizer, seed=1)
    model.config.dropout = model.config.attention_dropout = 0.1
    path = tmp_path_factory.mktemp("baseline")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def finetune_dir(tmp_path_factory, tiny_tokenizer):
    """Trained until it answers PAIRS word for word and then emits the eot token."""
    model = build_opt_model(tiny_tokenizer, seed=1)
    batch = collate(
        sft_rows(tiny_tokenizer), pad_token_id=tiny_tokenizer.pad_token_id, loss_on="all"
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp("finetune")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def load(path):
    tokenizer = load_eval_tokenizer(str(path), EOT, add_eot_token=False, trust_remote_code=False)
    model = load_eval_model(str(path), tokenizer, torch.device("cpu"), torch.float32, False)
    return model, tokenizer


def write_prompts(tmp_path, lines: list[str], name: str = "prompts.txt") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_report_has_one_row_per_prompt_with_both_answers(
    tmp_path, baseline_dir, finetune_dir, capsys
):
    prompts = write_prompts(tmp_path, [json.dumps({"prompt": p}) for p in PROMPTS], "p.jsonl")
    argv = [
        "--model_name_or_path_baseline", str(baseline_dir),
        "--model_name_or_path_finetune", str(finetune_dir),
        "--prompts", str(prompts), "--max_new_tokens", "16", "--batch_size", "2",
    ]  # fmt: skip
    assert run([*argv, "--output", str(tmp_path / "report.json")]) == 0
    console = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))

    assert [row["prompt"] for row in report["rows"]] == PROMPTS
    assert [row["finetune"] for row in report["rows"]] == [[answer] for answer in ANSWERS]
    assert all(len(row["baseline"]) == 1 for row in report["rows"])
    assert report["models"] == {"baseline": str(baseline_dir), "finetune": str(finetune_dir)}
    assert report["decoding"] == {"decoding": "greedy", "max_new_tokens": 16, "seed": 1234}
    assert report["perplexity"] is None
    for prompt, answer in PAIRS:
        assert prompt in console and answer in console

    assert run([*argv, "--output", str(tmp_path / "report.md")]) == 0
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0] == "| prompt | baseline | finetuned |"
    assert len(table) == 2 + len(PROMPTS)  # header, separator, one row per prompt
    assert table[2].startswith(f"| {PROMPTS[0].strip()} |") and table[2].endswith(
        f"| {ANSWERS[0]} |"
    )
    assert str(finetune_dir) in markdown and "decoding=greedy" in markdown
    assert not list(tmp_path.glob(".report*")), "no temporary file left behind"


def test_markdown_cells_escape_table_syntax():
    report = {
        "models": {"baseline": "a", "finetune": "b"},
        "decoding": {"decoding": "greedy"},
        "runtime": {"device": "cpu"},
        "perplexity": {
            "data_path": ["d"],
            "loss_on": "all",
            "rows": 3,
            "baseline": 9.0,
            "finetune": 2.5,
        },
        "rows": [{"prompt": "x | y", "baseline": ["line1\nline2"], "finetune": ["", "two"]}],
    }
    markdown = render_markdown(report)
    assert "| x \\| y | line1<br>line2 | (1) <br>(2) two |" in markdown
    assert "baseline 9.000, finetuned 2.500" in markdown


def test_greedy_generation_is_deterministic(baseline_dir):
    model, tokenizer = load(baseline_dir)
    cfg = DecodingConfig(max_new_tokens=16)
    first = generate_answers(model, tokenizer, PROMPTS, cfg, EOT)
    assert generate_answers(model, tokenizer, PROMPTS, cfg, EOT) == first
    assert all(answer for (answer,) in first), "the untrained model says something"


def test_sampling_is_reproducible_from_its_seed(baseline_dir):
    model, tokenizer = load(baseline_dir)
    cfg = DecodingConfig(decoding="sample", max_new_tokens=8, num_return_sequences=2, seed=7)
    first = generate_answers(model, tokenizer, PROMPTS[:2], cfg, EOT)
    assert generate_answers(model, tokenizer, PROMPTS[:2], cfg, EOT) == first
    cfg.seed = 8
    assert generate_answers(model, tokenizer, PROMPTS[:2], cfg, EOT) != first


@pytest.mark.parametrize(
    ("which", "decoding"),
    [("baseline", "greedy"), ("finetune", "greedy"), ("baseline", "beam")],
)
def test_batched_generation_matches_one_at_a_time(which, decoding, baseline_dir, finetune_dir):
    # Prompts of different lengths force left padding; the trained model's answers
    # end at different steps, so finished rows are padded while others continue.
    # Beam search returns two answers per prompt, which must stay with their prompt.
    model, tokenizer = load(baseline_dir if which == "baseline" else finetune_dir)
    prompts = [*PROMPTS, " Human: hi Assistant:"]
    cfg = DecodingConfig(decoding=decoding, max_new_tokens=12, num_beams=3)
    if decoding == "beam":
        cfg.num_return_sequences = 2
    batched = generate_answers(model, tokenizer, prompts, cfg, EOT)
    cfg.batch_size = 1
    assert generate_answers(model, tokenizer, prompts, cfg, EOT) == batched
    assert [len(answers) for answers in batched] == [cfg.num_return_sequences] * len(prompts)


def test_generation_stops_at_the_eot_token(finetune_dir):
    model, tokenizer = load(finetune_dir)
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    cfg = DecodingConfig(max_new_tokens=40)
    for prompt, answer in PAIRS:
        inputs = tokenizer([prompt], return_tensors="pt")
        output = model.generate(**inputs, **build_generate_kwargs(cfg, tokenizer, EOT))[0]
        new = output[inputs["input_ids"].shape[1] :].tolist()
        assert new[-1] == eot_id and len(new) < cfg.max_new_tokens
        assert tokenizer.decode(new[:-1]).strip() == answer
    assert generate_answers(model, tokenizer, PROMPTS, cfg, EOT) == [[a] for a in ANSWERS]


def test_an_eot_text_outside_the_vocabulary_stops_generation_too(finetune_dir):
    # " is blue" is several tokens: generation must stop on the text, not on one id.
    model, tokenizer = load(finetune_dir)
    prompt = next(p for p, a in PAIRS if a == "The sky is blue.")
    assert len(tokenizer.encode(" is blue", add_special_tokens=False)) > 1
    cfg = DecodingConfig(max_new_tokens=40)
    inputs = tokenizer([prompt], return_tensors="pt")
    output = model.generate(**inputs, **build_generate_kwargs(cfg, tokenizer, " is blue"))[0]
    assert tokenizer.decode(output[inputs["input_ids"].shape[1] :]).strip() == "The sky is blue"
    assert generate_answers(model, tokenizer, [prompt], cfg, " is blue") == [["The sky"]]


def test_trained_model_has_lower_perplexity_on_its_data(baseline_dir, finetune_dir, tiny_tokenizer):
    rows, pad = sft_rows(tiny_tokenizer), tiny_tokenizer.pad_token_id
    untrained = compute_perplexity(load(baseline_dir)[0], rows, pad, loss_on="all", batch_size=8)
    trained = compute_perplexity(load(finetune_dir)[0], rows, pad, loss_on="all", batch_size=8)
    assert trained < untrained / 10


def test_perplexity_does_not_depend_on_batching(baseline_dir, tiny_tokenizer):
    # Right padding must neither be scored nor shift what the real tokens see.
    model, _ = load(baseline_dir)
    rows, pad = sft_rows(tiny_tokenizer), tiny_tokenizer.pad_token_id
    one_batch = compute_perplexity(model, rows, pad, loss_on="all", batch_size=len(rows))
    assert compute_perplexity(model, rows, pad, loss_on="all", batch_size=1) == pytest.approx(
        one_batch, rel=1e-5
    )


def test_eval_data_path_scores_both_models_on_the_held_out_rows(
    tmp_path, baseline_dir, finetune_dir, capsys
):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": prompt, "chosen": " " + answer} for prompt, answer in PAIRS]
    for split in ("train", "eval"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    code = run(["--model_name_or_path_baseline", str(baseline_dir),
                "--model_name_or_path_finetune", str(finetune_dir),
                "--prompts", str(write_prompts(tmp_path, PROMPTS[:1])), "--max_new_tokens", "4",
                "--eval_data_path", str(data), "--max_seq_len", "64",
                "--data_output_path", str(tmp_path / "cache"),
                "--output", str(tmp_path / "r.json")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    perplexity = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["perplexity"]
    assert perplexity["rows"] == len(PAIRS) and perplexity["data_path"] == [str(data)]
    assert perplexity["finetune"] < perplexity["baseline"] / 10
    assert f"finetuned {perplexity['finetune']:.3f}" in capsys.readouterr().out


def test_prompts_file_text_and_jsonl_with_framing(tmp_path):
    # Bare questions get the training rows' frame, leading space included.
    text = write_prompts(tmp_path, ["Why is the sky blue? ", "", "Human: Hi. Assistant:"])
    assert load_prompts(text) == [
        " Human: Why is the sky blue? Assistant:",
        "Human: Hi. Assistant:",
    ]
    jsonl = write_prompts(tmp_path, ['{"prompt": "Say hello."}'], "p.jsonl")
    assert load_prompts(jsonl) == [frame_prompt("Say hello.")] == [" Human: Say hello. Assistant:"]


@pytest.mark.parametrize(
    ("baseline", "message"),
    [
        ("no-such-model/", "no such model folder"),
        ("empty-folder", "no config.json"),
        ("nobody/not-a-model", "cannot load the tokenizer of nobody/not-a-model"),  # Hub offline
    ],
)
def test_a_model_that_cannot_be_loaded_is_reported(
    baseline, message, tmp_path, finetune_dir, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty-folder").mkdir()
    code = run(["--model_name_or_path_baseline", baseline,
                "--model_name_or_path_finetune", str(finetune_dir)])  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error
    assert "--model_name_or_path_baseline" in error


def test_empty_prompts_file_is_reported(tmp_path, baseline_dir, finetune_dir, capsys):
    empty = write_prompts(tmp_path, ["", "   "])
    code = run(["--model_name_or_path_baseline", str(baseline_dir),
                "--model_name_or_path_finetune", str(finetune_dir), "--prompts", str(empty)])  # fmt: skip
    assert code == 2
    assert "--prompts" in capsys.readouterr().err


def test_flags_the_decoding_ignores_are_reported_together(baseline_dir, finetune_dir, capsys):
    code = run(["--model_name_or_path_baseline", str(baseline_dir),
                "--model_name_or_path_finetune", str(finetune_dir),
                "--num_beams", "4", "--top_k", "0", "--output", "x.txt"])  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err
    for expected in (
        "--num_beams has no effect with --decoding greedy",
        "--top_k",
        "--output x.txt",
    ):
        assert expected in error


def test_tokenizer_mismatch_warns_and_each_model_uses_its_own(tmp_path, finetune_dir, capsys):
    other_tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    other = tmp_path / "other"
    build_opt_model(other_tokenizer).save_pretrained(other)
    other_tokenizer.save_pretrained(other)
    code = run(["--model_name_or_path_baseline", str(other),
                "--model_name_or_path_finetune", str(finetune_dir),
                "--prompts", str(write_prompts(tmp_path, PROMPTS[:2])),
                "--max_new_tokens", "24", "--output", str(tmp_path / "r.json")])  # fmt: skip
    assert code == 0
    assert "tokenizers differ" in capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert [row["finetune"] for row in report["rows"]] == [[a] for a in ANSWERS[:2]]


def test_launcher_runs_a_comparison_without_importing_deepspeed(
    tmp_path, baseline_dir, finetune_dir
):
    # The CPU demo runs the comparison right after training; importing DeepSpeed would
    # cost seconds. A stand-in `deepspeed` that kills the process on import proves it.
    fake = tmp_path / "fake" / "deepspeed"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import os\nos._exit(97)\n")
    prompts = write_prompts(tmp_path, PROMPTS[:1])
    result = subprocess.run(
        ["bash", str(REPO / "evaluation_scripts" / "run_prompt.sh"), str(baseline_dir),
         str(finetune_dir), "--prompts", str(prompts), "--max_new_tokens", "16"],
        env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(fake.parent)},
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert PROMPTS[0] in result.stdout and ANSWERS[0] in result.stdout
