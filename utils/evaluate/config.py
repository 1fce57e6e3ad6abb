"""Command line of prompt_eval.py, parsed into one typed config and validated in one pass."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from utils.data.build import check_data_config
from utils.data.config import DSCHAT, LOSS_ON, DataConfig, default_cache_dir, effective_loss_on
from utils.errors import ConfigError, format_problems
from utils.evaluate.generation import (
    DECODINGS,
    HUB_DECODINGS,
    MODE_FLAGS,
    DecodingConfig,
    check_model_path,
)
from utils.evaluate.prompts import PROMPT_SETS
from utils.evaluate.report import REPORT_FORMATS

ROLES = {"baseline": "--model_name_or_path_baseline", "finetune": "--model_name_or_path_finetune"}
# The decoding flags only some modes read. They default to None on the command line
# ("not given"), so one the chosen --decoding ignores is reported, not silently dropped;
# DecodingConfig holds their real defaults.
MODE_ONLY_FLAGS = sorted(set().union(*MODE_FLAGS.values()))


@dataclass
class PromptEvalConfig:
    """Everything prompt_eval.py was asked to do; the flags' help text is in build_parser."""

    models: dict[str, str]
    decoding: DecodingConfig
    language: str = "English"
    prompts_path: str | None = None
    eot_token: str = "<|endoftext|>"
    add_eot_token: bool = False
    eval_data_path: list[str] = field(default_factory=list)
    max_seq_len: int = 512
    max_eval_rows: int | None = None
    loss_on: str | None = None  # None: decided by the chat template (effective_loss_on)
    chat_template: str | None = None  # None: the fine-tuned folder's own, else dschat
    system_prompt: str | None = None
    data_output_path: str = ""
    output: str | None = None
    ignored_flags: list[str] = field(default_factory=list)

    def eval_data(self) -> DataConfig:
        """The data layer's view of --eval_data_path: every row in the SFT phase, as training
        splits it (same seed and length), so its eval rows are the ones training held out."""
        return DataConfig(
            data_path=list(self.eval_data_path),
            data_split="10,0,0",
            data_output_path=self.data_output_path,
            max_seq_len=self.max_seq_len,
            seed=self.decoding.seed,
            eot_token=self.eot_token,
            add_eot_token=self.add_eot_token,
            chat_template=self.chat_template or DSCHAT,
            system_prompt=self.system_prompt,
        )

    @property
    def effective_loss_on(self) -> str:
        """--loss_on as training decides it: response with a chat template, all for dschat."""
        return effective_loss_on(self.loss_on, self.chat_template or DSCHAT)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Compare a baseline and a fine-tuned model: generations side by side, "
        "perplexity on shared evaluation rows."
    )
    m = p.add_argument_group("models")
    m.add_argument(
        "--model_name_or_path_baseline",
        required=True,
        help="The model before fine-tuning: a Hub name or a saved model folder.",
    )
    m.add_argument(
        "--model_name_or_path_finetune",
        required=True,
        help="The fine-tuned model folder (main.py's --output_dir).",
    )
    m.add_argument(
        "--eot_token",
        default="<|endoftext|>",
        help="End-of-conversation token; generation stops at it (and at eos).",
    )
    m.add_argument(
        "--add_eot_token",
        action="store_true",
        help="Add --eot_token to a tokenizer that lacks it (as training did).",
    )
    m.add_argument(
        "--chat_template",
        default=None,
        help="How prompts are written, for both models: 'dschat' (' Human: … Assistant:'), "
        "'model' (the fine-tuned model's own template) or a Jinja file. Default: the "
        "fine-tuned folder's template if it has one (main.py saves it), else dschat.",
    )
    m.add_argument(
        "--system_prompt",
        default=None,
        help="System turn opening every prompt that has none (needs a chat template).",
    )
    m.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="Allow code from model repositories (and the Hub-hosted contrastive and "
        "diverse beam searches) to run.",
    )

    g = p.add_argument_group("decoding")
    g.add_argument(
        "--decoding",
        choices=DECODINGS,
        default="greedy",
        help="How both models generate (default: greedy).",
    )
    g.add_argument(
        "--max_new_tokens", type=int, default=100, help="Longest answer in tokens (default 100)."
    )
    for name, kind, what in [
        ("num_beams", int, "Beams"),
        ("num_beam_groups", int, "Beam groups"),
        ("top_k", int, "Candidates per step"),
        ("penalty_alpha", float, "Degeneration penalty"),
        ("num_return_sequences", int, "Answers per prompt"),
    ]:
        modes = ", ".join(mode for mode, flags in MODE_FLAGS.items() if name in flags)
        g.add_argument(
            f"--{name}",
            type=kind,
            default=None,
            help=f"{what} ({modes}; default {getattr(DecodingConfig, name)}).",
        )
    g.add_argument(
        "--batch_size", type=int, default=8, help="Prompts (and perplexity rows) per forward pass."
    )
    g.add_argument(
        "--seed",
        type=int,
        default=1234,
        help="Seed for --decoding sample and for the data split: give training's --seed so "
        "the perplexity rows are the ones training held out.",
    )

    q = p.add_argument_group("prompts")
    q.add_argument(
        "--language",
        choices=sorted(PROMPT_SETS),
        default="English",
        help="Built-in prompt set (six questions).",
    )
    q.add_argument(
        "--prompts",
        default=None,
        help="File of prompts, one a line, or JSONL rows with a 'prompt' string or a "
        "'messages' list (a multi-turn conversation ending with the user's turn); replaces "
        "the built-in set. Bare questions get the 'Human: ... Assistant:' frame (dschat) "
        "or become the user's turn (chat template).",
    )

    e = p.add_argument_group("perplexity")
    e.add_argument(
        "--eval_data_path",
        nargs="*",
        default=[],
        help="Data sets (as main.py's --data_path) whose evaluation rows both models "
        "are scored on.",
    )
    e.add_argument(
        "--max_seq_len",
        type=int,
        default=512,
        help="Longest evaluation row in tokens (give training's value).",
    )
    e.add_argument(
        "--max_eval_rows",
        type=int,
        default=None,
        help="Score only the first N evaluation rows (default: all).",
    )
    e.add_argument(
        "--loss_on",
        choices=LOSS_ON,
        default=None,
        help="Tokens the perplexity covers, as main.py's flag of the same name (default as "
        "there: all for dschat, response with a chat template): give training's value so "
        "the numbers match its evaluation.",
    )
    e.add_argument(
        "--data_output_path",
        default=None,
        help="Tokenised-data cache folder (default: the one main.py uses).",
    )

    o = p.add_argument_group("output")
    o.add_argument(
        "--output",
        default=None,
        help="Also write the comparison to this file: .md (table) or .json.",
    )
    return p


def parse_args(argv: list[str] | None = None) -> PromptEvalConfig:
    args = build_parser().parse_args(argv)
    given = {
        name: getattr(args, name) for name in MODE_ONLY_FLAGS if getattr(args, name) is not None
    }
    return PromptEvalConfig(
        models={role: getattr(args, flag.removeprefix("--")) for role, flag in ROLES.items()},
        decoding=DecodingConfig(
            decoding=args.decoding,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            trust_remote_code=args.trust_remote_code,
            **given,
        ),
        ignored_flags=sorted(set(given) - MODE_FLAGS[args.decoding]),
        language=args.language,
        prompts_path=args.prompts,
        eot_token=args.eot_token,
        add_eot_token=args.add_eot_token,
        eval_data_path=list(args.eval_data_path),
        max_seq_len=args.max_seq_len,
        max_eval_rows=args.max_eval_rows,
        loss_on=args.loss_on,
        chat_template=args.chat_template,
        system_prompt=args.system_prompt,
        data_output_path=args.data_output_path or default_cache_dir(),
        output=args.output,
    )


def validate(cfg: PromptEvalConfig) -> None:
    """Every problem with the flags at once, before any model is loaded."""
    problems = [
        problem
        for role, path in cfg.models.items()
        if (problem := check_model_path(ROLES[role], path))
    ]
    d = cfg.decoding
    for name in cfg.ignored_flags:
        modes = ", ".join(mode for mode, flags in MODE_FLAGS.items() if name in flags)
        problems.append(
            f"--{name} has no effect with --decoding {d.decoding} (it applies to "
            f"{modes}); drop it or pick one of those"
        )
    if d.decoding in HUB_DECODINGS and not d.trust_remote_code:
        problems.append(
            f"--decoding {d.decoding} runs code transformers downloads from "
            f"hf.co/{HUB_DECODINGS[d.decoding]}; add --trust_remote_code to allow it"
        )
    for name, value in [
        ("max_new_tokens", d.max_new_tokens),
        ("batch_size", d.batch_size),
        ("num_return_sequences", d.num_return_sequences),
        ("top_k", d.top_k),
    ]:
        if value < 1:
            problems.append(f"--{name} {value}: must be at least 1")
    if cfg.max_eval_rows is not None and cfg.max_eval_rows < 1:
        problems.append(f"--max_eval_rows {cfg.max_eval_rows}: must be at least 1")
    if d.decoding in ("beam", "diverse_beam"):
        if d.num_beams < 2:
            problems.append(f"--num_beams {d.num_beams}: --decoding {d.decoding} needs 2 or more")
        if d.num_return_sequences > d.num_beams:
            problems.append(
                f"--num_return_sequences {d.num_return_sequences}: at most "
                f"--num_beams ({d.num_beams})"
            )
    if d.decoding == "diverse_beam" and (d.num_beam_groups < 2 or d.num_beams % d.num_beam_groups):
        problems.append(
            f"--num_beam_groups {d.num_beam_groups}: needs 2 or more groups that "
            f"divide --num_beams ({d.num_beams})"
        )
    if d.decoding == "contrastive" and not 0 < d.penalty_alpha <= 1:
        problems.append(f"--penalty_alpha {d.penalty_alpha}: must be in (0, 1]")
    if cfg.eval_data_path:
        # The data layer names main.py's flag; here the paths came from --eval_data_path.
        # The template is resolved once the tokenizers load; here only the data flags.
        data = dataclasses.replace(
            cfg.eval_data(), chat_template=DSCHAT, system_prompt=None, add_eot_token=False
        )
        problems += [p.replace("--data_path", "--eval_data_path") for p in check_data_config(data)]
    if cfg.output and Path(cfg.output).suffix.lower() not in REPORT_FORMATS:
        problems.append(f"--output {cfg.output}: unknown extension; use .md or .json")
    if problems:
        raise ConfigError(format_problems(problems))
