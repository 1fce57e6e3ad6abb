"""Everything a training run was asked to do: one typed group of settings per concern.

Each group is declared by the package it configures (utils/data/config.py, ...); the
command line (utils/cli/parse.py) is built from these fields. Code takes the smallest
group it needs, never the whole Config, except the few places that report on a whole
run (the summary, the OOM advice).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from utils.checkpoint.config import CheckpointConfig
from utils.data.config import BatchConfig, DataConfig, effective_loss_on
from utils.engine.config import EngineConfig, TrainConfig
from utils.flags import RecipeSettings
from utils.model.config import LoraConfig, ModelConfig
from utils.observe.config import ObserveConfig
from utils.planner.config import PlannerConfig


@dataclass(kw_only=True)
class Config:
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    observe: ObserveConfig = field(default_factory=ObserveConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    # Where values came from besides the command line: --config's recipe (a group, as
    # every field here is, whose one setting is the flag that read it).
    recipe: RecipeSettings = field(default_factory=RecipeSettings)

    def __post_init__(self) -> None:
        # --loss_on's default depends on --chat_template: decided once, here, so every
        # consumer (collate, packing, evaluation, the summary) reads the effective value.
        self.batch.loss_on = effective_loss_on(self.batch.loss_on, self.data.chat_template)
