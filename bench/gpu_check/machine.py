"""The machine the GPU check runs on, printed as one JSON line. On a CUDA machine it also
builds DeepSpeed's FusedAdam once (a JIT build: ~40 s on an H200), while the driver
prepares the model and data, so that no measured process compiles it."""

from __future__ import annotations

import json
import os
import platform
import time

import deepspeed
import torch
import transformers


def main() -> None:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "cpus": os.cpu_count(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpus=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
        )
        from deepspeed.ops.op_builder import FusedAdamBuilder

        started = time.perf_counter()
        FusedAdamBuilder().load()
        info["fused_adam_load_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
