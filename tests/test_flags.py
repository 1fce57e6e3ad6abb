"""Both commands' parsers are built from flag() fields, and a setting both take is declared
once: prompt_eval's --seed, --max_seq_len, --eot_token, ... are main.py's own."""

from __future__ import annotations

from utils.cli.parse import build_parser as build_main_parser
from utils.evaluate.config import build_parser as build_eval_parser

# prompt_eval's --chat_template defaults to the fine-tuned folder's own template (main.py
# saves it), not to main.py's dschat: a different setting under the same name.
OWN_DEFAULT = {"chat_template"}


def flags(parser) -> dict:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def test_a_flag_both_commands_take_has_one_default_type_choices_and_help():
    main, evaluate = flags(build_main_parser()), flags(build_eval_parser())
    shared = (set(main) & set(evaluate)) - OWN_DEFAULT - {"config"}
    assert shared >= {"eot_token", "add_eot_token", "seed", "max_seq_len", "loss_on"}
    assert shared >= {"system_prompt", "data_output_path", "trust_remote_code"}
    for name in shared:
        ours, theirs = main[name], evaluate[name]
        assert (ours.default, ours.type, ours.choices, ours.nargs, ours.help) == (
            theirs.default,
            theirs.type,
            theirs.choices,
            theirs.nargs,
            theirs.help,
        ), name


def test_prompt_eval_keeps_its_flags_and_defaults():
    evaluate = flags(build_eval_parser())
    # --data_output_path is main.py's per-user cache (checked above).
    defaults = {name: a.default for name, a in evaluate.items() if name != "data_output_path"}
    assert defaults == {
        "config": None,
        "model_name_or_path_baseline": None,
        "model_name_or_path_finetune": None,
        "eot_token": "<|endoftext|>",
        "add_eot_token": False,
        "chat_template": None,
        "system_prompt": None,
        "trust_remote_code": False,
        "decoding": "greedy",
        "max_new_tokens": 100,
        "num_beams": 4,
        "num_beam_groups": 2,
        "top_k": 4,
        "penalty_alpha": 0.6,
        "num_return_sequences": 1,
        "batch_size": 8,
        "seed": 1234,
        "language": "English",
        "prompts": None,
        "eval_data_path": [],
        "max_seq_len": 512,
        "max_eval_rows": None,
        "loss_on": None,
        "output": None,
    }
    assert evaluate["model_name_or_path_baseline"].required
    assert evaluate["model_name_or_path_finetune"].required
