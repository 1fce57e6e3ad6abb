"""Chat templates end to end: flags checked up front, a run, the saved folder, prompt_eval."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
)

import main as cli
from prompt_eval import run as prompt_eval
from tests.conftest import CORPUS
from utils.data.chat import load_chat_template
from utils.demo.chat_data import (
    DEMO_CONVERSATIONS,
    TEMPLATE_PATH,
    add_chat_tokens,
    build_chat_rows,
    chat_corpus,
)
from utils.demo.tiny import build_opt_model, build_tokenizer
from utils.errors import UserError
from utils.evaluate.prompts import dschat_prompt, read_prompts, render_prompts
from utils.model.save import write_model_folder
from utils.model.serving import carry_chat_template

CHATML = str(TEMPLATE_PATH)
IM_END = "<|im_end|>"


def write_jsonl(path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chat_tokenizer():
    train, _ = build_chat_rows(seed=0)
    tokenizer = build_tokenizer(CORPUS + chat_corpus(train), vocab_size=512)
    add_chat_tokens(tokenizer)  # ChatML's tokens, but no chat_template of its own
    return tokenizer


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, chat_tokenizer):
    path = tmp_path_factory.mktemp("tiny-chat-opt")
    build_opt_model(chat_tokenizer).save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_data_dir(tmp_path_factory):
    """Multi-turn demo conversations, plus one row with no assistant turn (skipped)."""
    path = tmp_path_factory.mktemp("chat-data")
    train, evaluation = build_chat_rows(seed=0)
    no_answer = {"messages": [{"role": "user", "content": "Anyone there?"}]}
    write_jsonl(path / "train.jsonl", [*train[:120], no_answer])
    write_jsonl(path / "eval.jsonl", evaluation[:8])
    return path


def chat_args(model_dir, data_dir, tmp_path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir),
        "--data_path", str(data_dir),
        "--data_split", "10,0,0",
        "--data_output_path", str(tmp_path / "cache"),
        "--max_seq_len", "256",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8",
        "--learning_rate", "3e-3",
        "--output_dir", str(tmp_path / "out"),
        *extra,
    ]  # fmt: skip


BROKEN = "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}\n"


@pytest.mark.parametrize(("extra", "message"), [
    (["--chat_template", "model"], "has no chat template"),
    (["--chat_template", "BROKEN"], "not a valid Jinja template: line 2"),
    (["--chat_template", CHATML, "--add_eot_token"], "--add_eot_token is DeepSpeed-Chat's"),
    (["--system_prompt", "Be brief."], "--system_prompt needs a chat template"),
], ids=["model-without-template", "jinja-syntax", "add-eot-with-template", "system-without-template"])  # fmt: skip
def test_unusable_chat_flags_fail_at_validation_before_any_data_work(
    chat_model_dir, chat_data_dir, tmp_path, capsys, extra, message
):
    broken = tmp_path / "broken.jinja"
    broken.write_text(BROKEN)
    extra = [str(broken) if arg == "BROKEN" else arg for arg in extra]
    code = cli.main(chat_args(chat_model_dir, chat_data_dir, tmp_path, *extra))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: invalid arguments:") and message in err
    assert not (tmp_path / "cache").exists(), "no data work before the flags are checked"


def test_dry_run_reports_the_template_the_trained_share_and_the_skips(
    chat_model_dir, chat_data_dir, tmp_path, capsys
):
    argv = chat_args(chat_model_dir, chat_data_dir, tmp_path, "--chat_template", CHATML)
    assert cli.main([*argv, "--dry_run"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["chat_template"] == CHATML and summary["loss_on"] == "response"
    assert 0.1 < summary["trained_token_share"] < 0.6  # replies, not the scaffolding
    assert summary["sources"][0]["skip_reasons"] == {"no assistant turn": 1}
    assert f"format       --chat_template {CHATML}: every assistant turn trained" in out


def test_a_chat_run_trains_saves_the_template_and_prompt_eval_speaks_it(
    chat_model_dir, chat_data_dir, tmp_path, capsys
):
    argv = chat_args(
        chat_model_dir,
        chat_data_dir,
        tmp_path,
        "--chat_template",
        CHATML,
        "--num_train_epochs",
        "2",
    )
    assert cli.main(argv) == 0, capsys.readouterr().err
    ppl = [float(line.split()[1].rstrip(",")) for line in capsys.readouterr().out.splitlines() if line.startswith("ppl: ")]  # fmt: skip
    assert ppl[-1] < ppl[0]

    out = tmp_path / "out"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == TEMPLATE_PATH.read_text()
    stops = GenerationConfig.from_pretrained(out).eos_token_id
    assert tokenizer.convert_tokens_to_ids(IM_END) in stops and tokenizer.eos_token_id in stops

    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"messages": m} for m, _ in DEMO_CONVERSATIONS]
    )
    report_path = tmp_path / "report.json"
    code = prompt_eval([
        "--model_name_or_path_baseline", str(chat_model_dir),
        "--model_name_or_path_finetune", str(out),
        "--prompts", str(prompts), "--max_new_tokens", "12",
        "--eval_data_path", str(chat_data_dir),
        "--data_output_path", str(tmp_path / "cache"), "--max_seq_len", "256",
        "--output", str(report_path),
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report = json.loads(report_path.read_text())
    # The fine-tuned folder's own template, for both models, stopping at its end of turn.
    assert report["prompt_format"] == (
        "chat template the fine-tuned model's own, answers stop at '<|im_end|>' or EOS"
    )
    assert report["rows"][2]["prompt"] == (
        "user: What is 3 plus 4?\nassistant: 3 plus 4 is 7.\nuser: What is the opposite of hot?"
    )
    answers = [a for row in report["rows"] for a in row["baseline"] + row["finetune"]]
    assert not any(IM_END in a or "<|im_start|>" in a for a in answers)
    assert report["perplexity"]["loss_on"] == "response" and report["perplexity"]["rows"] == 8
    assert report["perplexity"]["finetune"] < report["perplexity"]["baseline"]


class EndTurnAt(LogitsProcessor):
    """Greedy decoding that writes anything but a stop token, then the end of turn at `step`."""

    def __init__(self, prompt_len: int, step: int, end_of_turn: int, eos: int) -> None:
        self.prompt_len, self.step, self.end_of_turn, self.eos = prompt_len, step, end_of_turn, eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, [self.end_of_turn, self.eos]] = -float("inf")
        if input_ids.shape[1] - self.prompt_len == self.step:
            scores[:] = -float("inf")
            scores[:, self.end_of_turn] = 0.0
        return scores


def test_saved_folder_reloads_the_template_and_generation_stops_at_its_end_of_turn(
    chat_tokenizer, tmp_path
):
    model = build_opt_model(chat_tokenizer)
    template = load_chat_template(CHATML, chat_tokenizer)
    carry_chat_template(model, chat_tokenizer, template)
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    write_model_folder(model, chat_tokenizer, state, None, str(tmp_path / "out"))

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    reloaded = load_chat_template("model", tokenizer)
    assert (reloaded.text, reloaded.end_of_turn) == (template.text, IM_END)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    end_of_turn = tokenizer.convert_tokens_to_ids(IM_END)
    force = EndTurnAt(prompt.shape[1], 3, end_of_turn, tokenizer.eos_token_id)
    with torch.no_grad():  # the saved generation config alone decides where to stop
        output = saved.generate(
            prompt,
            max_new_tokens=10,
            do_sample=False,
            logits_processor=LogitsProcessorList([force]),
        )
    new = output[0, prompt.shape[1] :].tolist()
    assert len(new) == 4 and new[-1] == end_of_turn


def test_prompts_files_hold_questions_and_multi_turn_conversations(chat_tokenizer, tmp_path):
    conversation = [
        {"role": "user", "content": "What is 3 plus 4?"},
        {"role": "assistant", "content": "3 plus 4 is 7."},
        {"role": "user", "content": "What is the opposite of hot?"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say hello."}, {"messages": conversation}])
    prompts = read_prompts(path)
    assert prompts == ["Say hello.", conversation]
    assert dschat_prompt(prompts[1]) == (
        " Human: What is 3 plus 4? Assistant: 3 plus 4 is 7. Human: What is the opposite of hot?"
        " Assistant:"
    )
    template = load_chat_template(CHATML, chat_tokenizer)
    rendered = render_prompts(prompts, chat_tokenizer, template, system_prompt="Be brief.")
    system = {"role": "system", "content": "Be brief."}
    expected = [[system, conversation[2] | {"content": "Say hello."}], [system, *conversation]]
    for text, messages in zip(rendered, expected, strict=True):
        assert text == chat_tokenizer.apply_chat_template(
            messages, chat_template=template.text, add_generation_prompt=True, tokenize=False
        )
    assert rendered[0].endswith("<|im_start|>assistant\n")

    ends_with_answer = write_jsonl(tmp_path / "bad.jsonl", [{"messages": conversation[:2]}])
    with pytest.raises(UserError, match=r"bad.jsonl: line 1: turns must alternate .* end with"):
        read_prompts(ends_with_answer)
    with pytest.raises(UserError, match="system turn"):
        dschat_prompt([system, *conversation])
