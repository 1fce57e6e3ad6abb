"""Did fine-tuning help? Compare a baseline and a fine-tuned model on the same prompts.

Both models answer the same prompts (greedy by default), and with --eval_data_path
both are scored by perplexity on the same evaluation rows. The comparison is
printed side by side and, with --output, saved as Markdown or JSON.

    python prompt_eval.py --model_name_or_path_baseline facebook/opt-1.3b \\
        --model_name_or_path_finetune ./output --output comparison.md
"""

from __future__ import annotations

import os
import sys

from transformers.utils import logging as hf_logging

from utils.errors import UserError
from utils.evaluate.config import ROLES, PromptEvalConfig, parse_args, validate
from utils.evaluate.generation import (
    describe_tokenizer_mismatch,
    generate_answers,
    load_eval_model,
    load_eval_tokenizer,
    select_device_dtype,
)
from utils.evaluate.perplexity import compute_perplexity, load_eval_rows
from utils.evaluate.prompts import PROMPT_SETS, load_prompts
from utils.evaluate.report import build_report, format_console, save_report


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    validate(cfg)
    prompts = load_prompts(cfg.prompts_path) if cfg.prompts_path else PROMPT_SETS[cfg.language]
    tokenizers = load_tokenizers(cfg)
    device, dtype = select_device_dtype()
    # One model in memory at a time: two large checkpoints need not fit together.
    results = {
        role: evaluate_model(cfg, role, tokenizers[role], prompts, device, dtype)
        for role in cfg.models
    }
    report = build_report(
        models=cfg.models,
        decoding=cfg.decoding.settings(),
        runtime={"device": str(device), "dtype": str(dtype).removeprefix("torch.")},
        prompts=prompts,
        answers={role: answers for role, (answers, _) in results.items()},
        perplexity=summarize_perplexity(cfg, {role: ppl for role, (_, ppl) in results.items()}),
    )
    print(format_console(report))
    if cfg.output:
        save_report(report, cfg.output)
        print(f"report written to {cfg.output}", file=sys.stderr)


def load_tokenizers(cfg: PromptEvalConfig) -> dict:
    """Both tokenizers; if they differ, warn: each model keeps its own, answers stay comparable."""
    tokenizers = {}
    for role, path in cfg.models.items():
        try:
            tokenizers[role] = load_eval_tokenizer(
                path, cfg.eot_token, cfg.add_eot_token, cfg.decoding.trust_remote_code
            )
        except UserError as error:
            raise UserError(f"{ROLES[role]}: {error}") from None
    mismatch = describe_tokenizer_mismatch(tokenizers["baseline"], tokenizers["finetune"])
    if mismatch:
        print(
            f"warning: the baseline and fine-tuned tokenizers differ ({mismatch}); each model "
            "uses its own tokenizer and the evaluation rows are tokenised for each",
            file=sys.stderr,
        )
    return tokenizers


def evaluate_model(
    cfg: PromptEvalConfig, role: str, tokenizer, prompts: list[str], device, dtype
) -> tuple[list[list[str]], tuple[float, int] | None]:
    """One model's answers to `prompts` and, with --eval_data_path, its perplexity."""
    path = cfg.models[role]
    print(f"evaluating {role}: {path} ({device}, {dtype})", file=sys.stderr)
    model = load_eval_model(path, tokenizer, device, dtype, cfg.decoding.trust_remote_code)
    answers = generate_answers(model, tokenizer, prompts, cfg.decoding, cfg.eot_token)
    perplexity = evaluate_perplexity(model, tokenizer, cfg) if cfg.eval_data_path else None
    return answers, perplexity


def evaluate_perplexity(model, tokenizer, cfg: PromptEvalConfig) -> tuple[float, int]:
    """Perplexity of `model` on --eval_data_path's evaluation rows, and how many rows."""
    rows = load_eval_rows(cfg.eval_data(), tokenizer, cfg.max_eval_rows)
    ppl = compute_perplexity(
        model, rows, tokenizer.pad_token_id, loss_on=cfg.loss_on, batch_size=cfg.decoding.batch_size
    )
    return ppl, len(rows)


def summarize_perplexity(
    cfg: PromptEvalConfig, scores: dict[str, tuple[float, int] | None]
) -> dict | None:
    """The report's perplexity header: data sets, row count, one score per model."""
    if not cfg.eval_data_path:
        return None
    return {
        "data_path": cfg.eval_data_path,
        "loss_on": cfg.loss_on,
        "rows": scores["baseline"][1],
        **{role: score for role, (score, _) in scores.items()},
    }


def run(argv: list[str] | None = None) -> int:
    """main() with a user's mistake shown as one line and exit status 2, like main.py."""
    # Per-model loading and data-preparation bars would interleave with the comparison.
    hf_logging.disable_progress_bar()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets loads
    try:
        main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
