"""--config FILE: a YAML or JSON recipe fills the flags' settings, the command line wins,
mistakes in the file are named together, and the run summary says what came from it."""

from __future__ import annotations

import json

import pytest

import main as cli
from prompt_eval import run as prompt_eval
from utils.checkpoint.settings import run_settings, settings_changes
from utils.cli.parse import parse_args
from utils.errors import ConfigError
from utils.evaluate.config import parse_args as parse_eval_args

RECIPE = {
    "model_name_or_path": "facebook/opt-1.3b",
    "data_path": ["Dahoas/rm-static", "Dahoas/full-hh-rlhf"],
    "learning_rate": "9.65e-6",  # YAML reads 9.65e-6 as a float but 1e-3 as text: both work
    "max_seq_len": 256,
    "lr_scheduler_type": "linear",
    "gradient_checkpointing": True,
    "system_prompt": None,
    "deepspeed_config": "ds.json",  # DeepSpeed's own flag
}
YAML = """\
model_name_or_path: facebook/opt-1.3b
data_path:
  - Dahoas/rm-static
  - Dahoas/full-hh-rlhf
learning_rate: 9.65e-6
max_seq_len: 256
lr_scheduler_type: linear
gradient_checkpointing: true
system_prompt: null
deepspeed_config: ds.json
"""


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", ["recipe.yaml", "recipe.yml", "recipe.json"])
def test_a_recipe_fills_the_flags_and_the_command_line_overrides_it(tmp_path, name):
    text = json.dumps(RECIPE) if name.endswith(".json") else YAML
    path = write(tmp_path, name, text)
    cfg = parse_args(["--config", path, "--max_seq_len", "64"])
    assert cfg.model.model_name_or_path == "facebook/opt-1.3b"  # a required flag, from the file
    assert cfg.data.data_path == ["Dahoas/rm-static", "Dahoas/full-hh-rlhf"]
    assert cfg.train.learning_rate == 9.65e-6 and cfg.train.lr_scheduler_type == "linear"
    assert cfg.model.gradient_checkpointing and cfg.engine.deepspeed_config == "ds.json"
    assert cfg.data.max_seq_len == 64  # the command line wins
    assert cfg.train.num_train_epochs == 1  # neither: the default
    # Provenance: what the file set and the command line kept, converted.
    assert cfg.recipe.config.path == path
    assert "max_seq_len" not in cfg.recipe.config.values
    assert cfg.recipe.config.values["learning_rate"] == 9.65e-6


def test_every_mistake_in_a_recipe_is_named_together_with_the_file(tmp_path):
    path = write(
        tmp_path,
        "bad.yaml",
        "lerning_rate: 1e-3\n"  # a typo
        "max_seq_len: 512.5\n"  # not an integer
        "lr_scheduler_type: cosin\n"  # not a choice
        "gradient_checkpointing: 'yes'\n"  # a switch given text
        "seed: on\n"  # YAML's on is true, not a number
        "zero_stage: [1, 2]\n"  # a list for one value
        "eot_token: null\n",  # no unset state
    )
    with pytest.raises(ConfigError) as refused:
        parse_args(["--config", path, "--model_name_or_path", "m"])
    lines = str(refused.value).splitlines()
    assert lines[0] == f"--config {path}: the recipe cannot be used:"
    assert lines[1:] == [
        "  - lerning_rate is not a flag; did you mean learning_rate?",
        "  - max_seq_len 512.5: not an integer",
        "  - lr_scheduler_type 'cosin': choose from linear, cosine, cosine_with_restarts, "
        "polynomial, constant, constant_with_warmup",
        "  - gradient_checkpointing 'yes': a switch; give true or false",
        "  - seed: true/false is not an integer (YAML reads yes, no, on, off as true/false)",
        "  - zero_stage [1, 2]: give one value, not a list",
        "  - eot_token: null, but the flag has no unset state (default '<|endoftext|>')",
    ]


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("r.toml", "x = 1", "unknown extension; use .yaml, .yml or .json"),
        ("r.yaml", "max_seq_len: [1\n", "is not valid YAML"),
        ("r.json", "{'max_seq_len': 1}", "is not valid JSON"),
        ("r.yaml", "- max_seq_len\n", "must hold a mapping of flag names to values"),
        ("r.yaml", "config: other.yaml\n", "a recipe cannot name another recipe"),
    ],
)
def test_a_recipe_that_cannot_be_read_fails_before_any_work_with_exit_2(
    tmp_path, capsys, name, text, expected
):
    path = write(tmp_path, name, text)
    assert cli.main(["--config", path, "--model_name_or_path", "m"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --config {path}") and expected in err
    assert cli.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml cannot be read" in capsys.readouterr().err


def test_a_run_from_a_recipe_records_the_same_settings_as_from_flags(tmp_path):
    # Resume compares the effective values: a recipe run resumed with the same recipe, or
    # with the same values as flags, is the same run.
    flags = ["--model_name_or_path", "m", "--learning_rate", "1e-3", "--max_seq_len", "64"]
    flags += ["--data_path", "a", "b", "--lora_dim", "8", "--packing"]
    recipe = "learning_rate: 1e-3\nmax_seq_len: 64\ndata_path: [a, b]\nlora_dim: 8\npacking: true\n"
    from_flags = parse_args(flags)
    from_recipe = parse_args(
        ["--config", write(tmp_path, "r.yaml", recipe), "--model_name_or_path", "m"]
    )

    def settings(cfg):
        return run_settings(cfg, "key", world_size=1)

    assert settings_changes(settings(from_flags), settings(from_recipe)) == []
    assert settings(from_flags) == settings(from_recipe)


def test_the_run_summary_says_which_values_came_from_the_recipe(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the recipe named as a user would: a relative path
    data = tmp_path / "data"
    data.mkdir()
    row = {"prompt": " Human: What is 2 plus 3? Assistant:", "chosen": " 2 plus 3 is 5."}
    (data / "train.jsonl").write_text((json.dumps(row) + "\n") * 12)
    write(tmp_path, "r.yaml", "data_split: 10,0,0\nmax_seq_len: 32\nlearning_rate: 2e-3\n")
    argv = ["--config", "r.yaml", "--model_name_or_path", str(tiny_model_dir)]
    argv += ["--data_path", str(data), "--data_output_path", str(tmp_path / "cache")]
    assert cli.main([*argv, "--learning_rate", "1e-4", "--dry_run"]) == 0
    out = capsys.readouterr().out
    # --learning_rate came from the command line, so the line does not name it.
    assert "recipe       r.yaml: --data_split 10,0,0 --max_seq_len 32\n" in out


def test_prompt_eval_reads_a_recipe_and_reports_its_ignored_decoding_flags(tmp_path, capsys):
    recipe = write(
        tmp_path,
        "eval.yaml",
        "model_name_or_path_baseline: base\nmax_new_tokens: 16\nnum_beams: 3\nseed: 7\n",
    )
    cfg = parse_eval_args(
        ["--config", recipe, "--model_name_or_path_finetune", "ft", "--seed", "9"]
    )
    assert cfg.models.paths == {"baseline": "base", "finetune": "ft"}
    assert (cfg.decoding.max_new_tokens, cfg.decoding.num_beams, cfg.decoding.seed) == (16, 3, 9)
    # A decoding flag the recipe gives counts as given: greedy ignores --num_beams.
    assert cfg.ignored_flags == ["num_beams"]
    assert prompt_eval(["--config", recipe, "--model_name_or_path_finetune", "ft"]) == 2
    assert "--num_beams has no effect with --decoding greedy" in capsys.readouterr().err
