"""Resumable training checkpoints: DeepSpeed's engine state plus where the data stood.

Layout under --output_dir (DeepSpeed's, so its tools such as zero_to_fp32.py work):

    checkpoint-<step>/      engine.save_checkpoint files + run_state.json
    latest                  the tag of the newest published checkpoint

A checkpoint is written under the temporary name `.tmp-checkpoint-<step>`; when every
rank has finished writing, rank 0 adds run_state.json, renames the folder and then
rewrites `latest` (both atomic renames). A checkpoint is deleted (pruned, or replaced by
a new timeline) the other way round: renamed to `.tmp-checkpoint-<step>.removing` first,
then deleted. A run killed at any moment therefore leaves complete checkpoints and `.tmp-`
folders, which resuming ignores and rank 0 deletes when the next run starts.

Exact resume restores: weights, optimizer, LR schedule, loss scaler and step counters
(DeepSpeed), every rank's Python/NumPy/torch/accelerator RNG streams, and the data
position (epoch + rows of its order already trained; see utils/engine/elastic_position.py).
run_state.json also records the run's settings and shape: a resume that would change the
run is refused (utils/engine/run_settings.py), one on another number of ranks or ZeRO
stage goes through DeepSpeed's universal checkpoint (utils/engine/resume.py).

Test hook (the only one): SFT_TEST_SLOW_SAVE_STEP=N makes rank 0 sleep 60 s while the
checkpoint of step N is still unpublished, so a test can SIGKILL the run mid-save.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from utils.distributed import DistInfo, barrier, print_rank_0, rank_zero_first, warn_rank_0
from utils.engine.checkpoint_checks import (
    PREFIX,
    RUN_STATE,
    RunShape,
    check_files,
    check_model,
    published_checkpoints,
    run_shape,
    vet_checkpoint,
)
from utils.engine.config import MAX_DISK_WAIT_MINUTES, CheckpointConfig
from utils.engine.ds_config import EngineSetup
from utils.engine.elastic import MARKER, with_universal_loading
from utils.engine.position import DataPosition
from utils.engine.preemption import install_preemption_handlers, stop_requested
from utils.engine.resume import load_checkpoint, prepare_load, rank_0_does
from utils.engine.resume_state import gather_rng_states
from utils.errors import UserError
from utils.files import fsync_tree, write_atomically

TEMP_PREFIX = ".tmp-"
LATEST = "latest"
SLOW_SAVE_ENV = "SFT_TEST_SLOW_SAVE_STEP"


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


def find_checkpoint(cfg: CheckpointConfig, output_dir: str) -> str | None:
    """The checkpoint folder to resume from, or None to start fresh."""
    path = cfg.resume_from_checkpoint
    if not path:
        if published_checkpoints(output_dir):
            warn_rank_0(
                f"{output_dir} holds checkpoints of an earlier run; this run starts fresh and "
                "replaces them as it saves (add --resume_from_checkpoint auto to continue it)."
            )
        return None
    if path == "auto":
        found = published_checkpoints(output_dir)
        if not found:
            print_rank_0(f"no complete checkpoint in {output_dir}; starting from the beginning")
        return found[-1][1] if found else None
    if os.path.isfile(os.path.join(path, RUN_STATE)):
        return path
    if os.path.isfile(os.path.join(path, MARKER)):  # our universal conversion of a checkpoint
        return os.path.dirname(os.path.abspath(path))
    found = published_checkpoints(path)
    if found:
        return found[-1][1]
    if os.path.isdir(os.path.join(path, "zero")):  # made by DeepSpeed's ds_to_universal
        raise UserError(
            f"--resume_from_checkpoint {path!r} is a universal checkpoint made outside this "
            "tool, without the run's state; pass the checkpoint-<step> folder it came from "
            "(a checkpoint of another shape is converted automatically)."
        )
    raise UserError(
        f"--resume_from_checkpoint {path!r} is neither a complete checkpoint (no {RUN_STATE}; "
        f"an interrupted save leaves a {TEMP_PREFIX}{PREFIX}<step> folder) nor a folder holding "
        f"{PREFIX}<step> checkpoints. Pass one of the checkpoints it lists, or 'auto'."
    )


def save_checkpoint(
    engine, output_dir: str, position: DataPosition, record: dict[str, Any], dist: DistInfo
) -> str:
    """Write a checkpoint of the current step on every rank; publish it when all are done.

    `record`: what run_state.json says about the run besides its position (shape, settings).
    """
    step = engine.global_steps
    tag = f"{PREFIX}{step}"
    temp = os.path.join(output_dir, TEMP_PREFIX + tag)
    with rank_zero_first("clear stale checkpoint folders"):
        if dist.is_main:
            sweep_stale(output_dir)
    client_state = {"position": asdict(position), "rng": gather_rng_states()}
    engine.save_checkpoint(
        output_dir, tag=TEMP_PREFIX + tag, client_state=client_state, save_latest=False
    )
    barrier()  # every rank's files are written
    final = os.path.join(output_dir, tag)
    # Flushing a large checkpoint can outlast --dist_timeout_minutes: the others poll.
    with rank_zero_first(f"publish checkpoint {final}"):
        if dist.is_main:
            if os.environ.get(SLOW_SAVE_ENV) == str(step):
                time.sleep(60)
            state = {"step": step, "position": asdict(position), **record}
            state["files"] = sorted(os.listdir(temp))
            write_atomically(os.path.join(temp, RUN_STATE), json.dumps(state))
            fsync_tree(temp)
            _publish(temp, final, step, output_dir)
    return final


def _publish(temp: str, final: str, step: int, output_dir: str) -> None:
    # Checkpoints at or after this step belong to an abandoned timeline (an earlier run
    # resumed from an older checkpoint, or a fresh start); `auto` must never pick them.
    for other_step, other in published_checkpoints(output_dir):
        if other_step >= step:
            unpublish(other)
    os.replace(temp, final)
    write_atomically(os.path.join(output_dir, LATEST), os.path.basename(final))


def prune_checkpoints(output_dir: str, keep: int | None) -> None:
    """Delete all but the newest `keep` checkpoints (rank 0)."""
    if keep is None:
        return
    for _, path in published_checkpoints(output_dir)[:-keep]:
        unpublish(path)


def unpublish(path: str) -> None:
    """Delete a checkpoint so that a kill at any moment leaves it whole or a `.tmp-` folder:
    one atomic rename takes it out of view (auto never sees half of it), then the delete."""
    parent, name = os.path.split(path)
    doomed = os.path.join(parent, f"{TEMP_PREFIX}{name}.removing")
    shutil.rmtree(doomed, ignore_errors=True)  # an earlier kill's leftover of the same name
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def sweep_stale(output_dir: str | None) -> None:
    """Remove what killed saves and deletes left (no run owns them any more; rank 0)."""
    names = os.listdir(output_dir) if output_dir and os.path.isdir(output_dir) else []
    for name in names:
        path = os.path.join(output_dir, name)
        if name.startswith(TEMP_PREFIX + PREFIX):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(f".{LATEST}.") and name.endswith(".tmp"):  # write_atomically's
            os.remove(path)


@dataclass
class Checkpointer:
    """The checkpoint a run continues, and when to write the next one (used by the loop)."""

    cfg: CheckpointConfig
    output_dir: str
    settings: dict[str, Any]  # recorded in every checkpoint (utils/engine/run_settings.py)
    dist: DistInfo
    resume_from: str | None = None  # the checkpoint folder to continue
    state: dict | None = None  # its run_state.json
    universal: str | None = None  # its universal conversion, when the run's shape changed
    shape: RunShape | None = None  # this run's (set by engine_setup)
    start: DataPosition = field(default_factory=DataPosition)
    saved_step: int = -1  # the step whose checkpoint already exists (never written twice)
    preempted: str | None = None

    def engine_setup(self, model, setup: EngineSetup) -> EngineSetup:
        """Vet the checkpoint against the model and this run's ranks and ZeRO stage; the
        setup to build the engine with (it loads a universal checkpoint if the shape changed)."""
        self.shape = run_shape(model, self.dist.world_size, setup.zero_stage)
        if not self.resume_from:
            return setup
        check_model(self.resume_from, self.state, self.shape)
        self.universal = prepare_load(self.resume_from, self.state, self.shape, self.dist)
        if self.universal:
            return replace(setup, config=with_universal_loading(setup.config))
        return setup

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
    (None: its parameters are compared once the model is built, in engine_setup)."""
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
