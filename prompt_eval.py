"""Did fine-tuning help? Compare a baseline and a fine-tuned model on the same prompts.

Both models answer the same prompts (greedy by default), and with --eval_data_path
both are scored by perplexity on the same evaluation rows. The comparison is
printed side by side and, with --output, saved as Markdown or JSON.

    python prompt_eval.py --model_name_or_path_baseline facebook/opt-1.3b \\
        --model_name_or_path_finetune ./output --output comparison.md
"""

from __future__ import annotations

import dataclasses
import os
import sys

from transformers.utils import logging as hf_logging

from utils.data.build import chat_flag_problems
from utils.data.chat import ChatTemplate, load_chat_template
from utils.data.config import DSCHAT
from utils.errors import ConfigError, UserError, format_problems
from utils.evaluate.config import ROLES, PromptEvalConfig, parse_args, validate
from utils.evaluate.generation import (
    describe_tokenizer_mismatch,
    generate_answers,
    load_eval_model,
    load_eval_tokenizer,
    select_device_dtype,
)
from utils.evaluate.perplexity import compute_perplexity, load_eval_rows
from utils.evaluate.prompts import QUESTIONS, describe_prompt, read_prompts, render_prompts
from utils.evaluate.report import build_report, format_console, save_report


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    validate(cfg)
    if cfg.recipe.config:
        print("recipe " + "\n  ".join(cfg.recipe.config.describe()), file=sys.stderr)
    source = cfg.prompts
    prompts = read_prompts(source.prompts) if source.prompts else QUESTIONS[source.language]
    tokenizers = load_tokenizers(cfg)
    cfg, templates = load_templates(cfg, tokenizers)
    # Rendered before any model loads: a prompt the format cannot write fails fast.
    texts = {
        role: render_prompts(prompts, tokenizers[role], templates[role], cfg.models.system_prompt)
        for role in cfg.models.paths
    }
    device, dtype = select_device_dtype()
    # One model in memory at a time: two large checkpoints need not fit together.
    results = {
        role: evaluate_model(
            cfg, role, tokenizers[role], templates[role], texts[role], device, dtype
        )
        for role in cfg.models.paths
    }
    finetune_template = templates["finetune"]
    report = build_report(
        models=cfg.models.paths,
        decoding=cfg.decoding.settings(),
        runtime={"device": str(device), "dtype": str(dtype).removeprefix("torch.")},
        prompts=[describe_prompt(p) for p in prompts] if finetune_template else texts["finetune"],
        answers={role: answers for role, (answers, _) in results.items()},
        perplexity=summarize_perplexity(cfg, {role: ppl for role, (_, ppl) in results.items()}),
        prompt_format=describe_prompt_format(cfg, finetune_template),
    )
    print(format_console(report))
    if cfg.output:
        save_report(report, cfg.output)
        print(f"report written to {cfg.output}", file=sys.stderr)


def load_tokenizers(cfg: PromptEvalConfig) -> dict:
    """Both tokenizers; if they differ, warn: each model keeps its own, answers stay comparable."""
    tokenizers = {}
    m = cfg.models
    for role, path in m.paths.items():
        try:
            tokenizers[role] = load_eval_tokenizer(
                path, m.eot_token, m.add_eot_token, m.trust_remote_code
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


def load_templates(
    cfg: PromptEvalConfig, tokenizers: dict
) -> tuple[PromptEvalConfig, dict[str, ChatTemplate | None]]:
    """The chat template both models are prompted (and scored) through, checked against each
    tokenizer; cfg comes back with --chat_template resolved.

    Default: the fine-tuned folder's own template (main.py saves the one it trained with),
    else DeepSpeed-Chat's frame. The baseline is prompted the same way, so the comparison
    shows what fine-tuning changed, not a change of format.
    """
    spec = cfg.models.chat_template
    if spec is None:
        spec = "model" if tokenizers["finetune"].chat_template else DSCHAT
    cfg = dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, chat_template=spec))
    if problems := chat_flag_problems(cfg.eval_data()):
        raise ConfigError(format_problems(problems))
    templates: dict[str, ChatTemplate | None] = {}
    for role in ("finetune", "baseline"):
        if spec == "model" and role == "baseline" and templates["finetune"]:
            tokenizers[role].chat_template = templates["finetune"].text
        try:
            templates[role] = load_chat_template(spec, tokenizers[role])
        except UserError as error:
            raise UserError(f"{ROLES[role]}: {error}") from None
    return cfg, templates


def describe_prompt_format(cfg: PromptEvalConfig, template: ChatTemplate | None) -> str:
    """The report's line on how prompts were written and where answers stop."""
    if template is None:
        return f"dschat (' Human: … Assistant:'), answers stop at {cfg.models.eot_token!r} or EOS"
    source = "the fine-tuned model's own" if template.source == "model" else template.source
    stop = f"{template.end_of_turn!r} or EOS" if template.end_of_turn else "EOS"
    system = f", system prompt {cfg.models.system_prompt!r}" if cfg.models.system_prompt else ""
    return f"chat template {source}{system}, answers stop at {stop}"


def evaluate_model(
    cfg: PromptEvalConfig,
    role: str,
    tokenizer,
    template: ChatTemplate | None,
    prompts: list[str],
    device,
    dtype,
) -> tuple[list[list[str]], tuple[float, int] | None]:
    """One model's answers to `prompts` (rendered texts) and, with --eval_data_path, its
    perplexity."""
    path = cfg.models.paths[role]
    print(f"evaluating {role}: {path} ({device}, {dtype})", file=sys.stderr)
    model = load_eval_model(path, tokenizer, device, dtype, cfg.models.trust_remote_code)
    if template is None:
        answers = generate_answers(model, tokenizer, prompts, cfg.decoding, cfg.models.eot_token)
    else:  # the template wrote the special tokens; the reply ends at its end-of-turn token
        stop = template.end_of_turn or tokenizer.eos_token
        answers = generate_answers(
            model, tokenizer, prompts, cfg.decoding, stop, add_special_tokens=False
        )
    perplexity = (
        evaluate_perplexity(model, tokenizer, template, cfg)
        if cfg.perplexity.eval_data_path
        else None
    )
    return answers, perplexity


def evaluate_perplexity(
    model, tokenizer, template: ChatTemplate | None, cfg: PromptEvalConfig
) -> tuple[float, int]:
    """Perplexity of `model` on --eval_data_path's evaluation rows, and how many rows: the
    rows and labels come from training's data code, through the same template."""
    rows = load_eval_rows(cfg.eval_data(), tokenizer, template, cfg.perplexity.max_eval_rows)
    ppl = compute_perplexity(
        model,
        rows,
        tokenizer.pad_token_id,
        loss_on=cfg.effective_loss_on,
        batch_size=cfg.decoding.batch_size,
    )
    return ppl, len(rows)


def summarize_perplexity(
    cfg: PromptEvalConfig, scores: dict[str, tuple[float, int] | None]
) -> dict | None:
    """The report's perplexity header: data sets, row count, one score per model."""
    if not cfg.perplexity.eval_data_path:
        return None
    return {
        "data_path": cfg.perplexity.eval_data_path,
        "loss_on": cfg.effective_loss_on,
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
