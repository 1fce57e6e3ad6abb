"""Training state that exact resume needs beyond what DeepSpeed's checkpoint holds.

- Every rank's random streams (Python, NumPy, torch, accelerator).
- DeepSpeedCPUAdam's bias-correction terms: its C++ kernel keeps beta^t as a running
  product (one float multiplication per step) but recomputes it with pow() when it first
  sees a later step, e.g. after a restart. The two differ in the last bits, so a resumed
  run drifts from an unbroken one by float rounding. Replaying the step counter with a
  zero learning rate on a one-element dummy rebuilds the running product exactly.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def gather_rng_states() -> list[dict]:
    """Every rank's random streams (each rank draws its own dropout masks), on every rank."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # Plain lists and tensors only, so the state also loads with weights_only=True.
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        "accelerator": None if accelerator.device_name() == "cpu" else accelerator.get_rng_state(),
    }
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def set_rng_state(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"].cpu())
    if state["accelerator"] is not None:
        get_accelerator().set_rng_state(state["accelerator"].cpu())


def replay_cpu_adam_steps(engine) -> None:
    """Bring DeepSpeedCPUAdam's running beta^t products to the loaded step count (see above)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    optimizer = engine.optimizer
    while not isinstance(optimizer, DeepSpeedCPUAdam) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer  # ZeRO wrappers hold the real optimizer inside
    if not isinstance(optimizer, DeepSpeedCPUAdam):
        return
    steps = max((int(s.get("step", 0)) for s in optimizer.state.values()), default=0)
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    dummy = [torch.zeros(1) for _ in range(4)]  # param, grad, exp_avg, exp_avg_sq
    for step in range(1, steps + 1):
        optimizer.ds_opt_adam.adam_update(
            optimizer.opt_id, step, 0.0, beta1, beta2, group["eps"], 0.0, True, *dummy
        )
