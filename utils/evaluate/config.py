"""Command line of prompt_eval.py, parsed into one typed config and validated in one pass."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from utils.data.build import check_data_config
from utils.data.config import DSCHAT, BatchConfig, DataConfig, effective_loss_on
from utils.errors import ConfigError, format_problems
from utils.evaluate.generation import HUB_DECODINGS, MODE_FLAGS, DecodingConfig, check_model_path
from utils.evaluate.prompts import PROMPT_SETS
from utils.evaluate.report import REPORT_FORMATS
from utils.flags import RecipeSettings, flag, parse_settings, shared_flag
from utils.flags import build_parser as build_settings_parser
from utils.model.config import ModelConfig

ROLES = {"baseline": "--model_name_or_path_baseline", "finetune": "--model_name_or_path_finetune"}
# The decoding flags only some modes read: one given that the chosen --decoding ignores is
# reported, not silently dropped.
MODE_ONLY_FLAGS = set().union(*MODE_FLAGS.values())
DESCRIPTION = (
    "Compare a baseline and a fine-tuned model: generations side by side, perplexity on "
    "shared evaluation rows. The flags main.py also takes mean the same here: give "
    "training's --seed, --max_seq_len, --eot_token and --loss_on, so the perplexity rows "
    "and their labels are the ones training held out."
)


@dataclass(kw_only=True)
class EvalModelsConfig:
    """The two models, and how prompts are written for both."""

    model_name_or_path_baseline: str = flag(
        help="The model before fine-tuning: a Hub name or a saved model folder."
    )
    model_name_or_path_finetune: str = flag(
        help="The fine-tuned model folder (main.py's --output_dir)."
    )
    eot_token: str = shared_flag(DataConfig, "eot_token")
    add_eot_token: bool = shared_flag(DataConfig, "add_eot_token")
    # Not main.py's flag: by default the fine-tuned folder's own template, which main.py saved.
    chat_template: str | None = flag(
        None,
        "How prompts are written, for both models: 'dschat' (' Human: … Assistant:'), "
        "'model' (the fine-tuned model's own template) or a Jinja file. Default: the "
        "fine-tuned folder's template if it has one (main.py saves it), else dschat.",
    )
    system_prompt: str | None = shared_flag(DataConfig, "system_prompt")
    trust_remote_code: bool = shared_flag(ModelConfig, "trust_remote_code")

    @property
    def paths(self) -> dict[str, str]:
        """Each model's path by role ("baseline", "finetune")."""
        return {
            "baseline": self.model_name_or_path_baseline,
            "finetune": self.model_name_or_path_finetune,
        }


@dataclass(kw_only=True)
class PromptsConfig:
    language: str = flag(
        "English", "Built-in prompt set (six questions).", choices=tuple(sorted(PROMPT_SETS))
    )
    prompts: str | None = flag(
        None,
        "File of prompts, one a line, or JSONL rows with a 'prompt' string or a 'messages' "
        "list (a multi-turn conversation ending with the user's turn); replaces the built-in "
        "set. Bare questions get the 'Human: ... Assistant:' frame (dschat) or become the "
        "user's turn (chat template).",
    )


@dataclass(kw_only=True)
class PerplexityConfig:
    eval_data_path: list[str] = flag(
        default_factory=list,
        help="Data sets (as main.py's --data_path) whose evaluation rows both models are "
        "scored on.",
    )
    max_seq_len: int = shared_flag(DataConfig, "max_seq_len")
    max_eval_rows: int | None = flag(None, "Score only the first N evaluation rows (default: all).")
    loss_on: str | None = shared_flag(BatchConfig, "loss_on")
    data_output_path: str = shared_flag(DataConfig, "data_output_path")


@dataclass(kw_only=True)
class PromptEvalConfig:
    """Everything prompt_eval.py was asked to do: one group of flags per concern."""

    models: EvalModelsConfig
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    output: str | None = flag(None, "Also write the comparison to this file: .md (table) or .json.")
    recipe: RecipeSettings = field(default_factory=RecipeSettings)
    # Mode-only decoding flags given (on the command line or in the recipe) that the
    # chosen --decoding does not read: validation reports them.
    ignored_flags: list[str] = field(default_factory=list)

    def eval_data(self) -> DataConfig:
        """The data layer's view of --eval_data_path: every row in the SFT phase, as training
        splits it (same seed and length), so its eval rows are the ones training held out."""
        m, p = self.models, self.perplexity
        return DataConfig(
            data_path=list(p.eval_data_path),
            data_split="10,0,0",
            data_output_path=p.data_output_path,
            max_seq_len=p.max_seq_len,
            seed=self.decoding.seed,
            eot_token=m.eot_token,
            add_eot_token=m.add_eot_token,
            chat_template=m.chat_template or DSCHAT,
            system_prompt=m.system_prompt,
        )

    @property
    def effective_loss_on(self) -> str:
        """--loss_on as training decides it: response with a chat template, all for dschat."""
        return effective_loss_on(self.perplexity.loss_on, self.models.chat_template or DSCHAT)


def build_parser() -> argparse.ArgumentParser:
    return build_settings_parser(PromptEvalConfig, DESCRIPTION)


def parse_args(argv: list[str] | None = None) -> PromptEvalConfig:
    cfg, given = parse_settings(PromptEvalConfig, build_parser(), argv)
    ignored = (given & MODE_ONLY_FLAGS) - MODE_FLAGS[cfg.decoding.decoding]
    return dataclasses.replace(cfg, ignored_flags=sorted(ignored))


def validate(cfg: PromptEvalConfig) -> None:
    """Every problem with the flags at once, before any model is loaded."""
    problems = [
        problem
        for role, path in cfg.models.paths.items()
        if (problem := check_model_path(ROLES[role], path))
    ]
    d = cfg.decoding
    for name in cfg.ignored_flags:
        modes = ", ".join(mode for mode, flags in MODE_FLAGS.items() if name in flags)
        problems.append(
            f"--{name} has no effect with --decoding {d.decoding} (it applies to "
            f"{modes}); drop it or pick one of those"
        )
    if d.decoding in HUB_DECODINGS and not cfg.models.trust_remote_code:
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
    if (rows := cfg.perplexity.max_eval_rows) is not None and rows < 1:
        problems.append(f"--max_eval_rows {rows}: must be at least 1")
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
    if cfg.perplexity.eval_data_path:
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
