"""The checkpointer: the checkpoint a run continues, and when it writes the next one.

Exact resume restores: weights, optimizer, LR schedule, loss scaler and step counters
(DeepSpeed), every rank's Python/NumPy/torch/accelerator RNG streams, and the data
position (epoch + rows of its order already trained; see utils/checkpoint/position.py).
run_state.json also records the run's settings and shape: a resume that would change the
run is refused (utils/checkpoint/settings.py), one on another number of ranks or ZeRO
stage goes through DeepSpeed's universal checkpoint (utils/checkpoint/resume.py). How
checkpoints lie on disk, and are written and deleted safely: utils/checkpoint/store.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from utils.checkpoint.checks import (
    PREFIX,
    RunShape,
    check_files,
    check_model,
    run_shape,
    vet_checkpoint,
)
from utils.checkpoint.config import MAX_DISK_WAIT_MINUTES, CheckpointConfig
from utils.checkpoint.position import DataPosition
from utils.checkpoint.preemption import install_preemption_handlers, stop_requested
from utils.checkpoint.resume import load_checkpoint, prepare_load, rank_0_does
from utils.checkpoint.store import find_checkpoint, prune_checkpoints, save_checkpoint, sweep_stale
from utils.checkpoint.universal import with_universal_loading
from utils.distributed import DistInfo, print_rank_0


def checkpoint_problems(cfg: CheckpointConfig) -> list[str]:
    """Flag problems, for the one validation step."""
    problems = []
    if cfg.save_steps < 0:
        problems.append(f"--save_steps {cfg.save_steps} must be 0 (off) or a positive number.")
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        problems.append(f"--save_total_limit {cfg.save_total_limit} must be at least 1.")
    if not 0 <= (wait := cfg.disk_full_wait_minutes) <= MAX_DISK_WAIT_MINUTES:
        problems.append(
            f"--disk_full_wait_minutes {wait} must be between 0 and {MAX_DISK_WAIT_MINUTES} (the "
            "other ranks wait for rank 0's save at most 6 hours)."
        )
    path = cfg.resume_from_checkpoint
    if path and path != "auto" and not os.path.isdir(path):
        problems.append(
            f"--resume_from_checkpoint {path!r} is not a folder; pass a checkpoint-<step> "
            "folder, an output folder holding checkpoints, or 'auto'."
        )
    return problems


@dataclass
class Checkpointer:
    """The checkpoint a run continues, and when to write the next one (used by the loop)."""

    cfg: CheckpointConfig
    output_dir: str
    settings: dict[str, Any]  # recorded in every checkpoint (utils/checkpoint/settings.py)
    dist: DistInfo
    resume_from: str | None = None  # the checkpoint folder to continue
    state: dict | None = None  # its run_state.json
    universal: str | None = None  # its universal conversion, when the run's shape changed
    shape: RunShape | None = None  # this run's (set by engine_config)
    start: DataPosition = field(default_factory=DataPosition)
    saved_step: int = -1  # the step whose checkpoint already exists (never written twice)
    preempted: str | None = None

    def engine_config(self, model, ds_config: dict, zero_stage: int) -> dict:
        """Vet the checkpoint against the model and this run's ranks and ZeRO stage (the
        merged `ds_config`'s); the DeepSpeed config to build the engine with (it loads a
        universal checkpoint if the run's shape changed)."""
        self.shape = run_shape(model, self.dist.world_size, zero_stage)
        if not self.resume_from:
            return ds_config
        check_model(self.resume_from, self.state, self.shape)
        self.universal = prepare_load(self.resume_from, self.state, self.shape, self.dist)
        return with_universal_loading(ds_config) if self.universal else ds_config

    def resume(self, engine) -> DataPosition:
        """Load the checkpoint chosen at start-up (if any); the position training continues from."""
        if self.resume_from:
            self.start = load_checkpoint(engine, self.resume_from, self.state, self.universal)
            self.saved_step = engine.global_steps
            rows = self.start.rows_done
            print_rank_0(
                f"resumed from {self.resume_from}: step {engine.global_steps}, epoch "
                f"{self.start.epoch + 1}, {rows} {'row' if rows == 1 else 'rows'} into it"
            )
        return self.start

    def after_step(self, engine, position: DataPosition) -> None:
        """Checkpoint when --save_steps says so."""
        if self.due(engine.global_steps):
            self._save(engine, position)

    def stop_for(self, signal: str | None, engine, position: DataPosition) -> bool:
        """`signal`: a stop signal some rank received (the same answer on every rank). If
        there is one, checkpoint where training stands; True when the run must stop now."""
        self.preempted = signal
        if signal:
            self._save(engine, position)
        return self._stop_if_preempted()

    def due(self, step: int) -> bool:
        """Whether `after_step` checkpoints step `step` (a stop signal aside)."""
        every = self.cfg.save_steps
        return bool(every) and step % every == 0

    def after_epoch(self, engine, position: DataPosition) -> bool:
        """The epoch-end checkpoint (when saving is on); True when the run must stop now."""
        self.preempted = stop_requested(self.dist.device)
        if self.preempted or self.cfg.save_steps:
            self._save(engine, position)
        return self._stop_if_preempted()

    def _save(self, engine, position: DataPosition) -> None:
        if self.saved_step == engine.global_steps:
            return
        record = {"shape": asdict(self.shape), "settings": self.settings}
        path = save_checkpoint(engine, self.output_dir, position, record, self.dist)
        if self.dist.is_main:
            prune_checkpoints(self.output_dir, self.cfg.save_total_limit)
        self.saved_step = engine.global_steps
        print_rank_0(f"saved checkpoint {path}")

    def _stop_if_preempted(self) -> bool:
        if self.preempted:
            print_rank_0(
                f"stopping on {self.preempted} after step {self.saved_step}; continue with the "
                "same command plus --resume_from_checkpoint auto"
            )
        return bool(self.preempted)

    def advice_after_failed_save(self, step: int) -> str:
        """Where the trained state survives when the final save of step `step` fails."""
        if self.saved_step == step:
            return (
                f"The trained weights are safe in {self.output_dir}/{PREFIX}{step}: once there "
                "is room, rerun the same command with --resume_from_checkpoint auto; it trains "
                "nothing more and saves them."
            )
        if self.saved_step >= 0:
            return (
                f"The newest checkpoint is {PREFIX}{self.saved_step} ({step - self.saved_step} "
                "steps before the end): --resume_from_checkpoint auto continues from it."
            )
        return (
            "No checkpoint holds the trained weights (--save_steps 0), so the run must be "
            "repeated; --save_steps N keeps a resumable copy."
        )


def build_checkpointer(
    cfg: CheckpointConfig,
    output_dir: str,
    settings: dict[str, Any],
    dist: DistInfo,
    planned_model: Callable[[], torch.nn.Module] | None = None,
) -> Checkpointer:
    """Clear what killed runs left, pick the checkpoint to resume and vet it (before the
    model loads, so a refusal is cheap), and route SIGTERM/SIGUSR1 to checkpoint-and-exit.
    `planned_model` builds this run's model on the meta device, only to vet a checkpoint
    (None: its parameters are compared once the model is built, in engine_config)."""
    if dist.is_main:
        sweep_stale(output_dir)
    path = find_checkpoint(cfg, output_dir)
    state = None
    if path:
        planned = planned_model() if planned_model else None
        state = vet_checkpoint(path, settings, planned, trusted=cfg.trust_checkpoint)
        rank_0_does(lambda: check_files(path, state), dist, "check the checkpoint's files")
    install_preemption_handlers()
    return Checkpointer(cfg, output_dir, settings, dist, resume_from=path, state=state)
