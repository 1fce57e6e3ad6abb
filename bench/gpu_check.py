"""One-shot GPU check (issue 14 item 6): real tokens/s, MFU and peak memory per batching mode.

OPT-1.3B-shaped random weights, bf16, ZeRO-2, micro-batch 8, seq 512, on real dialogue
lengths (HH-RLHF through the OPT tokenizer when ../shared/data is there, else lengths drawn
from a fixed log-normal fit of them), `--steps` optimizer steps each of:

  pad      every row padded to 512 (DeepSpeed-Chat)
  default  length-grouped batches padded to their longest row
  packing  several rows per 512-token row, 4D block-diagonal mask (sdpa)
  varlen   packing without padding or mask: a micro-batch's packs in one row, per-example
           boundaries to FlashAttention-2's variable-length path (--attn_implementation
           flash_attention_2; run where flash-attn is installed on a CUDA GPU, else skipped)
  chunked  default batches with the chunked loss (utils/model/chunked_loss.py, the tool's
           default) instead of full logits; the other runs use the plain loss

Each run is a bare DeepSpeed loop (initialize, forward, backward, step) over this
repository's loaders, collators and losses (utils/model/loss.py), so the figures show what
the batching and the loss cost, not the training loop's bookkeeping. `--tiny` runs a tiny model for a few steps on
the CPU (fp32, ZeRO-2, seq 128): CI keeps this script working without a GPU.

    bash bench/gpu_check.sh            # on a CUDA machine
    bash bench/gpu_check.sh --tiny     # anywhere, well under a minute

Last line: `default/pad=<r> packing/pad=<r> varlen/pad=<r> chunked/default=<r> chunked_memory/default=<r>`
(tokens/s ratios, then the peak-memory ratio; n/a where a run was skipped).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from itertools import islice

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import deepspeed
import torch
from datasets import Dataset
from transformers import OPTConfig, OPTForCausalLM

from utils.data.config import BatchConfig
from utils.data.loaders import build_train_loader, choose_loader_workers, open_batches
from utils.distributed import init_distributed
from utils.engine.precision import TORCH_DTYPES
from utils.model.attention import FLASH_ATTENTION, flash_attn_installed
from utils.model.loss import choose_loss_path, count_trained, prepare_batch, summed_nll
from utils.observe.throughput import build_flop_shape, lookup_peak_tflops

PAD = 1
RUNS = ("pad", "default", "packing", "varlen", "chunked")
# Log-normal fit of HH-RLHF harmless-base dialogue lengths in OPT tokens (median ~150).
LENGTH_MU, LENGTH_SIGMA = math.log(150), 0.75


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny model, CPU-sized, few steps")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (30; tiny 3)")
    p.add_argument("--rows", type=int, default=None, help="rows of data (2000; tiny 96)")
    p.add_argument("--dialogues", default="../shared/data/hh-rlhf-harmless-base/test.jsonl")
    p.add_argument("--tokenizer", default="../shared/data/opt-tokenizer")
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()
    args.steps = args.steps or (3 if args.tiny else 30)
    args.rows = args.rows or (64 if args.tiny else 2000)
    args.max_seq_len = 128 if args.tiny else 512
    return args


def model_config(tiny: bool) -> OPTConfig:
    hidden, layers, heads = (64, 2, 4) if tiny else (2048, 24, 32)  # OPT-1.3B
    return OPTConfig(
        vocab_size=512 if tiny else 50272,
        hidden_size=hidden,
        word_embed_proj_dim=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        ffn_dim=4 * hidden,
        max_position_embeddings=2048,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=PAD,
    )


def dialogue_lengths(args: argparse.Namespace) -> list[int]:
    """Token counts of real dialogues (when the shared data is there), else drawn from the fit."""
    if not args.tiny and os.path.isfile(args.dialogues) and os.path.isdir(args.tokenizer):
        import tempfile

        from bench.data_prep import load_opt_tokenizer, rm_static_rows

        with tempfile.TemporaryDirectory() as work:
            tokenizer = load_opt_tokenizer(args.tokenizer, work)
        rows = rm_static_rows(args.dialogues, args.rows, seed=args.seed)
        texts = [r["prompt"] + r["chosen"] for r in rows]
        return [min(len(ids) + 1, 512) for ids in tokenizer(texts)["input_ids"]]
    gen = torch.Generator().manual_seed(args.seed)
    draws = torch.empty(args.rows).log_normal_(LENGTH_MU, LENGTH_SIGMA, generator=gen)
    return [int(min(max(n, 16), args.max_seq_len)) for n in draws.tolist()]


def build_dataset(lengths: list[int], vocab: int, seed: int) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in lengths]
    spans = [[[n // 3, n]] for n in lengths]  # the last two thirds are the "response"
    return Dataset.from_dict({"input_ids": ids, "loss_spans": spans})


def run_one(name: str, args, dataset, device: torch.device, dtype: str) -> dict | None:
    """`args.steps` timed optimizer steps (after one warm-up step) of one batching mode."""
    config = model_config(args.tiny)
    on_cuda = device.type == "cuda"
    if name == "varlen" and not (on_cuda and dtype != "fp32" and flash_attn_installed()):
        return None  # FlashAttention-2 runs on CUDA GPUs in 16 bits only
    torch.manual_seed(args.seed)
    with device:
        model = OPTForCausalLM(config)
    if name == "varlen":
        model.set_attn_implementation(FLASH_ATTENTION)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=on_cuda)
    ds_config = {
        "train_micro_batch_size_per_gpu": 8,
        "train_batch_size": 8,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bf16"},
        "gradient_clipping": 1.0,
        "steps_per_print": 2**31 - 1,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    batch_cfg = {
        "pad": BatchConfig(pad_to_max_len=True, loss_on="all"),
        "packing": BatchConfig(packing=True, loss_on="all"),
        "varlen": BatchConfig(packing=True, loss_on="all"),
    }.get(name, BatchConfig(loss_on="all"))
    loader = build_train_loader(
        dataset, batch_cfg, micro_batch=8, max_seq_len=args.max_seq_len, pad_token_id=PAD,
        seed=args.seed, rank=0, world_size=1, mask_dtype=TORCH_DTYPES[dtype],
        flat_packs=name == "varlen",
        workers=choose_loader_workers(None, on_cuda=on_cuda, masked_packs=name == "packing"),
    )  # fmt: skip
    loss = choose_loss_path(
        model, "on" if name == "chunked" else "off", zero_stage=2,
        device_type=device.type, fp32=True, compiled=False,
    )  # fmt: skip
    real = sum_sq = 0
    losses = []
    for step, batch in enumerate(islice(_forever(loader), args.steps + 1)):
        if step == 1:  # step 0 warms up kernels and allocators
            _sync(device)
            started = time.perf_counter()
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(device)
        count = count_trained(batch["labels"])
        nll = summed_nll(engine, prepare_batch(batch, loss, device), loss)
        engine.backward(nll / max(count, 1))
        engine.step()
        if step >= 1:
            lengths = batch["seq_lens"].double()
            real += int(lengths.sum())
            sum_sq += int((lengths**2).sum())
            losses.append(float(nll.detach()) / max(count, 1))
    _sync(device)
    seconds = time.perf_counter() - started
    flops = build_flop_shape(engine.module, False).training_flops(real, sum_sq)
    peak_name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    peak_tflops = lookup_peak_tflops(peak_name, dtype, None)
    result = {
        "tokens_per_s": real / seconds,
        "mfu": flops / seconds / 1e12 / peak_tflops if peak_tflops else None,
        "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if on_cuda else None,
        "loss": losses[-1],
    }
    del engine, model, optimizer
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
    return result


def _forever(loader):
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        with open_batches(loader) as batches:  # its workers stop when the variant is done
            yield from batches
        epoch += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    args = parse_args()
    dist = init_distributed()
    device = dist.device
    dtype = "bf16" if device.type == "cuda" else "fp32"
    lengths = dialogue_lengths(args)
    dataset = build_dataset(lengths, model_config(args.tiny).vocab_size, args.seed)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{name}: {'tiny OPT' if args.tiny else 'OPT-1.3B-shaped'}, {dtype}, ZeRO-2, "
        f"micro-batch 8, seq {args.max_seq_len}, {len(lengths)} rows (mean length "
        f"{sum(lengths) / len(lengths):.0f}), {args.steps} timed steps per run",
        flush=True,
    )
    results = {}
    for run in args.runs.split(","):
        results[run] = run_one(run, args, dataset, device, dtype)
        r = results[run]
        if r is None:
            print(f"{run:8s} skipped (needs flash-attn on a CUDA GPU, 16-bit)", flush=True)
            continue
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} MiB"
        print(
            f"{run:8s} {r['tokens_per_s']:10.0f} real tokens/s  MFU {mfu:>6}  "
            f"peak {peak:>10}  loss {r['loss']:.4f}",
            flush=True,
        )
    print(ratio_line(results))


def ratio_line(results: dict[str, dict | None]) -> str:
    def ratio(top: str, bottom: str, key: str = "tokens_per_s") -> str:
        a, b = results.get(top), results.get(bottom)
        if not a or not b or a[key] is None or b[key] is None:
            return "n/a"
        return f"{a[key] / b[key]:.2f}"

    return (
        f"default/pad={ratio('default', 'pad')} packing/pad={ratio('packing', 'pad')} "
        f"varlen/pad={ratio('varlen', 'pad')} chunked/default={ratio('chunked', 'default')} "
        f"chunked_memory/default={ratio('chunked', 'default', 'peak_mib')}"
    )


if __name__ == "__main__":
    main()
