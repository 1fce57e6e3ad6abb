"""The launchers' recipes (training_scripts/recipes/): each family's script passes one, and
each recipe is one main.py reads without a complaint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO
from utils.cli.parse import parse_args

SCRIPTS_DIR = REPO / "training_scripts"
RECIPES = sorted((SCRIPTS_DIR / "recipes").glob("*.yaml"))
PASSED = re.compile(r'--config "\$RECIPES/([\w.]+)"')


def test_every_launcher_passes_a_recipe_and_every_recipe_is_used():
    used = {}
    for script in SCRIPTS_DIR.rglob("run_*.sh"):
        names = PASSED.findall(script.read_text())
        assert len(names) == 1, f"{script} passes {names}"
        used[script.relative_to(SCRIPTS_DIR).as_posix()] = names[0]
    assert set(used.values()) == {recipe.name for recipe in RECIPES}
    # One recipe per family: the scripts of one folder share theirs.
    for script, recipe in used.items():
        family = Path(script).parent.as_posix().replace("/", "_")
        assert recipe == f"{family}.yaml", script


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_a_launcher_recipe_parses_into_the_run_settings(recipe):
    cfg = parse_args(["--config", str(recipe), "--model_name_or_path", "m"])
    assert cfg.recipe.config.values  # it sets something
    for name, value in cfg.recipe.config.values.items():
        groups = [vars(getattr(cfg, g)) for g in vars(cfg) if name in vars(getattr(cfg, g))]
        assert groups and groups[0][name] == value, name
