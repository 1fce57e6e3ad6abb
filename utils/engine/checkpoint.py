"""Resumable training checkpoints: DeepSpeed's engine state plus where the data stood.

Layout under --output_dir (DeepSpeed's, so its tools such as zero_to_fp32.py work):

    checkpoint-<step>/      engine.save_checkpoint files + run_state.json
    latest                  the tag of the newest published checkpoint

A checkpoint is written under the temporary name `.tmp-checkpoint-<step>`; when every
rank has finished writing, rank 0 adds run_state.json, renames the folder and then
rewrites `latest` (both atomic renames). A run killed mid-save therefore leaves only a
`.tmp-` folder, which resuming ignores and the next save deletes.

Exact resume restores: weights, optimizer, LR schedule, loss scaler and step counters
(DeepSpeed), every rank's Python/NumPy/torch/accelerator RNG streams, and the data
position (epoch + micro-batches already consumed in it; the sampler replays the epoch's
order and skips that many batches).

Test hook (the only one): SFT_TEST_SLOW_SAVE_STEP=N makes rank 0 sleep 60 s while the
checkpoint of step N is still unpublished, so a test can SIGKILL the run mid-save.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field

from utils.distributed import DistInfo, barrier, print_rank_0, warn_rank_0
from utils.engine.accumulation import DataPosition
from utils.engine.checkpoint_checks import RUN_STATE, RunShape, check_resumable, run_shape
from utils.engine.config import CheckpointConfig
from utils.engine.ds_config import EngineSetup
from utils.engine.preemption import install_preemption_handlers, stop_requested
from utils.engine.resume_state import gather_rng_states, replay_cpu_adam_steps, set_rng_state
from utils.errors import UserError
from utils.files import fsync_tree

PREFIX = "checkpoint-"
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
    path = cfg.resume_from_checkpoint
    if path and path != "auto" and not os.path.isdir(path):
        problems.append(
            f"--resume_from_checkpoint {path!r} is not a folder; pass a checkpoint-<step> "
            "folder, an output folder holding checkpoints, or 'auto'."
        )
    return problems


def published_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        step = name.removeprefix(PREFIX)
        if name.startswith(PREFIX) and step.isdigit() and os.path.isfile(f"{path}/{RUN_STATE}"):
            found.append((int(step), path))
    return sorted(found)


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
    found = published_checkpoints(path)
    if found:
        return found[-1][1]
    raise UserError(
        f"--resume_from_checkpoint {path!r} is neither a complete checkpoint (no {RUN_STATE}; "
        f"an interrupted save leaves a {TEMP_PREFIX}{PREFIX}<step> folder) nor a folder holding "
        f"{PREFIX}<step> checkpoints. Pass one of the checkpoints it lists, or 'auto'."
    )


def load_checkpoint(engine, path: str) -> DataPosition:
    """Restore the engine, this rank's RNG streams and the data position from `path`."""
    load_dir, tag = os.path.split(os.path.abspath(path))
    loaded, client_state = engine.load_checkpoint(load_dir, tag=tag)
    if loaded is None:
        raise UserError(f"DeepSpeed could not load checkpoint {path}; see the log above.")
    set_rng_state(client_state["rng"][engine.global_rank])
    replay_cpu_adam_steps(engine)
    position = DataPosition(**client_state["position"])
    print_rank_0(
        f"resumed from {path}: step {engine.global_steps}, epoch {position.epoch + 1}, "
        f"{position.micro_batches} micro-batches into it"
    )
    return position


def save_checkpoint(
    engine, output_dir: str, position: DataPosition, shape: RunShape, dist: DistInfo
) -> str:
    """Write a checkpoint of the current step on every rank; publish it when all are done."""
    step = engine.global_steps
    tag = f"{PREFIX}{step}"
    temp = os.path.join(output_dir, TEMP_PREFIX + tag)
    if dist.is_main:
        _remove_stale(output_dir)
    barrier()
    client_state = {"position": asdict(position), "rng": gather_rng_states()}
    engine.save_checkpoint(
        output_dir, tag=TEMP_PREFIX + tag, client_state=client_state, save_latest=False
    )
    barrier()  # every rank's files are written
    final = os.path.join(output_dir, tag)
    if dist.is_main:
        if os.environ.get(SLOW_SAVE_ENV) == str(step):
            time.sleep(60)
        state = {"step": step, "position": asdict(position), "shape": asdict(shape)}
        state["files"] = sorted(os.listdir(temp))
        _write_atomically(os.path.join(temp, RUN_STATE), json.dumps(state))
        fsync_tree(temp)
        _publish(temp, final, step, output_dir)
    barrier()
    return final


def _publish(temp: str, final: str, step: int, output_dir: str) -> None:
    # Checkpoints at or after this step belong to an abandoned timeline (an earlier run
    # resumed from an older checkpoint, or a fresh start); `auto` must never pick them.
    for other_step, other in published_checkpoints(output_dir):
        if other_step >= step:
            os.remove(os.path.join(other, RUN_STATE))  # unpublish first, then delete
            shutil.rmtree(other)
    os.replace(temp, final)
    _write_atomically(os.path.join(output_dir, LATEST), os.path.basename(final))


def prune_checkpoints(output_dir: str, keep: int | None) -> None:
    """Delete all but the newest `keep` checkpoints (rank 0)."""
    if keep is None:
        return
    for _, path in published_checkpoints(output_dir)[:-keep]:
        os.remove(os.path.join(path, RUN_STATE))
        shutil.rmtree(path)


def _remove_stale(output_dir: str) -> None:
    """Folders of saves killed before publishing (no run owns them any more)."""
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        if name.startswith(TEMP_PREFIX + PREFIX):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def _write_atomically(path: str, text: str) -> None:
    temp = f"{path}.tmp"
    with open(temp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


@dataclass
class Checkpointer:
    """When to checkpoint, and whether the run was asked to stop (used by the training loop)."""

    cfg: CheckpointConfig
    output_dir: str
    shape: RunShape
    dist: DistInfo
    resume_from: str | None = None
    start: DataPosition = field(default_factory=DataPosition)
    saved_step: int = -1  # the step whose checkpoint already exists (never written twice)
    preempted: str | None = None

    def resume(self, engine) -> DataPosition:
        """Load the checkpoint chosen at start-up (if any); the position training continues from."""
        if self.resume_from:
            self.start = load_checkpoint(engine, self.resume_from)
            self.saved_step = engine.global_steps
        return self.start

    def after_step(self, engine, position: DataPosition) -> bool:
        """Checkpoint when due or preempted; True when the run must stop now."""
        self.preempted = stop_requested(self.dist.device)
        every = self.cfg.save_steps
        if self.preempted or (every and engine.global_steps % every == 0):
            self._save(engine, position)
        return self._stop_if_preempted()

    def after_epoch(self, engine, position: DataPosition) -> bool:
        """The epoch-end checkpoint (when saving is on); True when the run must stop now."""
        self.preempted = stop_requested(self.dist.device)
        if self.preempted or self.cfg.save_steps:
            self._save(engine, position)
        return self._stop_if_preempted()

    def _save(self, engine, position: DataPosition) -> None:
        if self.saved_step == engine.global_steps:
            return
        path = save_checkpoint(engine, self.output_dir, position, self.shape, self.dist)
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
    cfg: CheckpointConfig, output_dir: str, model, setup: EngineSetup, dist: DistInfo
) -> Checkpointer:
    """Pick and vet the checkpoint to resume (before the engine exists, so a refusal is
    cheap), and route SIGTERM/SIGUSR1 to checkpoint-and-exit from here on."""
    shape = run_shape(model, dist.world_size, setup.zero_stage)
    path = find_checkpoint(cfg, output_dir)
    if path:
        check_resumable(path, shape)
    install_preemption_handlers()
    return Checkpointer(cfg=cfg, output_dir=output_dir, shape=shape, dist=dist, resume_from=path)
