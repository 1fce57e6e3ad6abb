"""Benchmark: peak memory of DeepSpeed training on a CPU in fp32, DeepSpeed's bf16 mode and
torch.autocast bf16 (DeepSpeed's "torch_autocast" section), at ZeRO-0 and ZeRO-2.

Why: at ZeRO stage 0 DeepSpeed's "bf16" mode wraps the optimizer in FP16_UnfusedOptimizer:
bf16 weights and gradients beside an fp32 master copy, plus fp32 copies of every gradient at
each step (about 20-24 bytes per parameter against fp32's 16). torch.autocast keeps the fp32
weights and gradients and runs matrix products in bf16 (a bf16 copy of each weight while it is
used). Each variant trains an OPT-shaped model (random weights) for a few steps with
DeepSpeed's CPU Adam and the tool's default loss, in its own process; the peak is the
process's peak RSS growth over its RSS before the model is built.

    python bench/cpu_bf16.py

Two shapes: `states` (model states dominate: hidden 512, 6 layers, vocab 50,272, batch 2 x 128)
and `activations` (hidden 192, 3 layers, vocab 50,272, batch 8 x 512). Speed is printed but
means little on a CPU without AMX-bf16 (bf16 is emulated there, several times slower).
Last line: `<shape> zero<N>: bf16/fp32=<r> autocast/fp32=<r>` (peak memory), per shape and stage.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

SHAPES = {
    "states": {"hidden": 512, "layers": 6, "batch": 2, "seq": 128},
    "activations": {"hidden": 192, "layers": 3, "batch": 8, "seq": 512},
}
MODES = ("fp32", "bf16", "autocast")
VOCAB = 50272


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_variant(shape: str, mode: str, zero: int, steps: int) -> dict:
    import deepspeed
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from transformers import OPTConfig, OPTForCausalLM

    from utils.distributed import init_distributed
    from utils.model.loss import choose_loss_path, count_trained, prepare_batch, summed_nll

    dist = init_distributed()
    s = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (s["batch"], s["seq"]), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    torch.manual_seed(0)
    base = rss_bytes()
    config = OPTConfig(
        vocab_size=VOCAB, hidden_size=s["hidden"], word_embed_proj_dim=s["hidden"],
        ffn_dim=4 * s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=max(1, s["hidden"] // 64), max_position_embeddings=s["seq"] + 2,
        dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    model = OPTForCausalLM(config)
    ds_config = {
        "train_batch_size": s["batch"],
        "train_micro_batch_size_per_gpu": s["batch"],
        "zero_optimization": {"stage": zero},
        "bf16": {"enabled": mode == "bf16"},
        "torch_autocast": {"enabled": mode == "autocast", "dtype": "bfloat16"},
        "gradient_clipping": 1.0,
        "steps_per_print": 2**31 - 1,
    }
    optimizer = DeepSpeedCPUAdam(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    after_init = rss_bytes() - base
    path = choose_loss_path(
        model, "auto", zero_stage=zero, device_type="cpu", fp32=False, compiled=False
    )
    count = count_trained(ids)
    times, losses = [], []
    for _ in range(steps + 1):
        started = time.perf_counter()
        nll = summed_nll(engine, prepare_batch(batch, path, dist.device), path)
        engine.backward(nll / count)
        engine.step()
        times.append(time.perf_counter() - started)
        losses.append(float(nll) / count)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {
        "optimizer": type(engine.optimizer).__name__,
        "after_init_mib": after_init / 2**20,
        "end_mib": (rss_bytes() - base) / 2**20,
        "peak_mib": peak / 2**20,
        "step_s": min(times[1:]),  # step 0 warms up allocators and optimizer state
        "loss": losses[-1],
        "params": sum(p.numel() for p in model.parameters()),
        "loss_path": path.describe().split(":")[0],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", help="(internal) SHAPE,MODE,ZERO: run one and print JSON")
    p.add_argument("--shapes", default="states,activations")
    p.add_argument("--zero", default="0,2", help="ZeRO stages to compare")
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    if args.variant:
        shape, mode, zero = args.variant.split(",")
        print(json.dumps(run_variant(shape, mode, int(zero), args.steps)))
        return
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "HF_HUB_OFFLINE": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # each variant is a group of one
    print(f"{'shape':<12}{'ZeRO':>5} {'mode':<9}{'optimizer':<24}{'params':>8}"
          f"{'after init':>12}{'peak':>10}{'step s':>8}{'loss':>8}  loss path")  # fmt: skip
    summary = []
    for shape in args.shapes.split(","):
        for zero in args.zero.split(","):
            peaks = {}
            for mode in MODES:
                cmd = [sys.executable, os.path.abspath(__file__), "--variant"]
                cmd += [f"{shape},{mode},{zero}", "--steps", str(args.steps)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                peaks[mode] = r["peak_mib"]
                print(f"{shape:<12}{zero:>5} {mode:<9}{r['optimizer']:<24}"
                      f"{r['params'] / 1e6:>7.1f}M{r['after_init_mib']:>9.0f}MiB"
                      f"{r['peak_mib']:>7.0f}MiB{r['step_s']:>8.2f}{r['loss']:>8.3f}  "
                      f"{r['loss_path']}", flush=True)  # fmt: skip
            summary.append(
                f"{shape} zero{zero}: bf16/fp32={peaks['bf16'] / peaks['fp32']:.2f} "
                f"autocast/fp32={peaks['autocast'] / peaks['fp32']:.2f}"
            )
    print("; ".join(summary))


if __name__ == "__main__":
    main()
