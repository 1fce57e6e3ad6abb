"""Settings of the memory planner (--estimate_memory).

Each field is also the command-line flag of the same name (see utils/flags.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from utils.flags import flag


@dataclass(kw_only=True)
class PlannerConfig:
    estimate_memory: bool = flag(
        False,
        "Print the per-GPU/per-node memory this run needs and the largest model of the same "
        "family that fits --gpu_memory_gb; loads no data or weights.",
    )
    gpu_memory_gb: float = flag(
        80.0, "GPU memory per device the planner fits the largest model into."
    )
    num_gpus_per_node: int = flag(
        1, "GPUs per node the planner assumes (the launcher's --num_gpus)."
    )
    num_nodes: int = flag(1, "Nodes the planner assumes.")

    @property
    def world_size(self) -> int:
        return self.num_gpus_per_node * self.num_nodes
