"""The README's first command: the embedded CPU demo must show fine-tuning working."""

from __future__ import annotations

import re
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import REPO, child_env
from utils.demo.embedded import DEMO_PROMPTS
from utils.demo.tiny import EOT


def greedy_answers(model_dir) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stop = [tokenizer.convert_tokens_to_ids(EOT), tokenizer.eos_token_id]
    answers = []
    for question, _ in DEMO_PROMPTS:
        ids = tokenizer(f" Human: {question} Assistant:", return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=24, do_sample=False, eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return answers


def correct(answers: list[str]) -> int:
    return sum(expected in got for got, (_, expected) in zip(answers, DEMO_PROMPTS, strict=True))


@pytest.mark.slow
def test_tiny_demo_learns_what_it_is_asked(tmp_path):
    env = child_env(EMBEDDED=str(tmp_path / "embedded"))  # run_tiny.sh starts its own group
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", "training_scripts/opt/cpu/run_tiny.sh", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "training.log").read_text()
    ppl = [float(v) for v in re.findall(r"^ppl: ([0-9.e+-]+),", log, re.M)]
    assert ppl[-1] <= ppl[0] / 2, ppl
    baseline = greedy_answers(tmp_path / "embedded" / "tiny-opt")
    finetuned = greedy_answers(out)
    assert correct(finetuned) >= 6, finetuned
    assert correct(baseline) <= 1, baseline
