"""Resume a universal checkpoint through main.main on another world size or ZeRO stage.

Stands in for the resume path until utils/checkpoint.py converts and loads universal
checkpoints itself (then tests/test_elastic.py can run main.py directly): it lets the
shape check pass, loads with {"checkpoint": {"load_universal": true}} (given as
--deepspeed_config), restores the param groups, and records what the engine holds right
after the load.

    python tests/elastic_worker.py UNIVERSAL_DIR SOURCE_CHECKPOINT REPORT main.py-flags...
"""

from __future__ import annotations

import json
import os
import sys

import deepspeed
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

import main
import utils.engine.checkpoint as checkpoint
from utils.engine.elastic import restore_param_groups


def loaded_report(engine, source: str) -> dict:
    """Differences between the engine's weights and the source checkpoint's fp32 weights."""
    parent, tag = os.path.split(source)
    expected = get_fp32_state_dict_from_zero_checkpoint(parent, tag=tag)
    stage3 = engine.zero_optimization_stage() == 3
    differing = []
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=stage3):
            if not torch.equal(param.detach().cpu(), expected[name]):
                differing.append(name)
    optimizer = engine.optimizer
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return {
        "differing": differing,
        "compared": len(expected),
        "weight_decay": [g["weight_decay"] for g in optimizer.param_groups],
        "global_steps": engine.global_steps,
    }


def run(universal: str, source: str, report_path: str, flags: list[str]) -> int:
    checkpoint.check_resumable = lambda path, shape: None  # the shape changes on purpose
    load = checkpoint.load_checkpoint

    def load_universal(engine, path):
        position = load(engine, path)
        restore_param_groups(engine, path)
        report = loaded_report(engine, source)
        if engine.global_rank == 0:
            with open(report_path, "w") as f:
                json.dump(report, f)
        return position

    checkpoint.load_checkpoint = load_universal
    return main.main([*flags, "--resume_from_checkpoint", universal])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))
