"""Peak memory and step time: full fine-tune vs LoRA vs LoRA + gradient checkpointing;
with --chunked_loss, the plain loss vs the chunked loss (utils/model/chunked_loss.py).

Same OPT-shaped model (random weights, the real OPT vocabulary size), same batch,
same AdamW steps. Each variant runs in its own subprocess so its peak is its own.
Peak memory is CPU RSS growth over the process's RSS right before the model is
built (so the import floor, identical for all variants, does not dilute the ratio),
or torch.cuda.max_memory_allocated on a GPU. LoRA is rank --lora_dim on every
decoder-layer linear with only the adapters trained (--only_optimize_lora).

    python bench/memory.py [--data_dir DIR_WITH_gsm8k_AND_opt-tokenizer] [--device cuda]

Last line: `lora/full=<ratio> lora_gc/full=<ratio>` (peak memory).

    python bench/memory.py --chunked_loss [--hidden_size 256 --num_layers 2]

trains the full model with the plain loss (fp32 logits, utils/model/loss.py's plain_nll) and
with the chunked loss in both modes, at vocabularies of 50,272 (OPT) and 128,256 (Llama-3),
micro-batch 8 x 512 tokens. Last line: `<vocab>: fused/plain peak=<r> speed=<r> cpu_speed=<r>
...`, speed being plain step time / chunked step time (above 1: the chunked loss is faster)
in wall-clock seconds, cpu_speed the same in the process's CPU seconds (steadier on a
machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "full": {"lora": False, "gc": False},
    "lora": {"lora": True, "gc": False},
    "lora_gc": {"lora": True, "gc": True},
}
OPT_VOCAB = 50272
LLAMA3_VOCAB = 128256
LOSSES = ("hf", "plain", "fused", "recompute")  # hf: the model's own loss (labels=...)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=VARIANTS, help="(internal) run one variant and print JSON")
    p.add_argument(
        "--data_dir",
        default=None,
        help="Folder holding gsm8k/train.jsonl and opt-tokenizer/; random tokens if unset.",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_layers", type=int, default=6)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--lora_dim", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="Timed steps after one warm-up step.")
    p.add_argument("--vocab", type=int, default=OPT_VOCAB)
    p.add_argument("--loss", choices=LOSSES, default="hf", help="(internal) the loss of a variant")
    p.add_argument(
        "--chunked_loss",
        action="store_true",
        help="Compare the plain and chunked losses at vocab 50k and 128k instead.",
    )
    return p.parse_args()  # fmt: skip


def load_batch(args: argparse.Namespace):
    """input_ids (batch, seq_len): GSM8K text through OPT's tokenizer, or random ids."""
    import torch

    if args.data_dir is None:
        gen = torch.Generator().manual_seed(0)
        return torch.randint(
            4, min(50265, args.vocab), (args.batch_size, args.seq_len), generator=gen
        )
    from transformers import GPT2Tokenizer

    with tempfile.TemporaryDirectory() as tok_dir:
        src = os.path.join(args.data_dir, "opt-tokenizer")
        shutil.copy(os.path.join(src, "gpt2-vocab.json"), os.path.join(tok_dir, "vocab.json"))
        shutil.copy(os.path.join(src, "gpt2-merges.txt"), os.path.join(tok_dir, "merges.txt"))
        tokenizer = GPT2Tokenizer(
            os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt")
        )
    with open(os.path.join(args.data_dir, "gsm8k", "train.jsonl")) as f:
        rows = [json.loads(next(f)) for _ in range(64)]
    text = " ".join(f"Human: {r['question']} Assistant: {r['answer']}" for r in rows)
    ids = tokenizer(text)["input_ids"]
    need = args.batch_size * args.seq_len
    return torch.tensor((ids * (need // len(ids) + 1))[:need]).view(args.batch_size, args.seq_len)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_variant(args: argparse.Namespace) -> dict:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from utils.model.config import LoraConfig
    from utils.model.lora import apply_lora

    spec = VARIANTS[args.variant]
    ids = load_batch(args).to(args.device)
    torch.manual_seed(0)
    base_rss = rss_bytes()
    config = OPTConfig(
        vocab_size=args.vocab, hidden_size=args.hidden_size, word_embed_proj_dim=args.hidden_size,
        ffn_dim=4 * args.hidden_size, num_hidden_layers=args.num_layers,
        num_attention_heads=args.hidden_size // 64, max_position_embeddings=args.seq_len + 2,
    )  # fmt: skip
    model = OPTForCausalLM(config).to(args.device)
    if spec["gc"]:
        model.gradient_checkpointing_enable()
    if spec["lora"]:
        model = apply_lora(model, LoraConfig(lora_dim=args.lora_dim, only_optimize_lora=True))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    times, cpu_times = [], []  # CPU time (user + system, all threads): steadier under load
    for step in range(args.steps + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = training_loss(model, ids, args.loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if step:  # step 0 warms up allocators and lazily created optimizer state
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    return {
        "variant": args.variant,
        "peak_bytes": peak,
        "step_s": statistics.median(times),
        "step_cpu_s": statistics.median(cpu_times),
        "trainable_params": sum(p.numel() for p in trainable),
        "loss": loss.item(),
    }


def training_loss(model, ids, loss: str):
    """The mean NLL over every next token, computed as `loss` says."""
    if loss == "hf":
        return model(input_ids=ids, labels=ids).loss
    if loss == "plain":
        from utils.model.loss import token_nll

        nll, count = token_nll(model(input_ids=ids).logits, ids, fp32=True)
    else:
        from utils.model.chunk_size import default_chunk_tokens
        from utils.model.chunked_loss import forward_chunked_nll

        chunk = default_chunk_tokens(model.config.vocab_size, None)  # a CPU's chunks
        nll, count = forward_chunked_nll(model, {"input_ids": ids}, ids, chunk, loss)
    return nll / count


def run_in_subprocess(args_list: list[str]) -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args_list],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_losses(args: argparse.Namespace) -> None:
    """Plain vs chunked loss (both modes), full fine-tune, at two vocabulary sizes."""
    forwarded = [a for a in sys.argv[1:] if a != "--chunked_loss"]
    shape = ["--batch_size", "8", "--seq_len", "512"]
    what = "GPU max allocated" if args.device.startswith("cuda") else "CPU RSS growth"
    print(f"model: OPT-shaped hidden {args.hidden_size}, {args.num_layers} layers; batch 8 x 512 "
          f"tokens; full fine-tune, AdamW; device {args.device}")  # fmt: skip
    print(f"{'vocab':>8} {'loss':<10}{'peak (' + what + ')':>30}{'step s':>9}{'CPU s':>9}"
          f"{'loss':>9}")  # fmt: skip
    summary = []
    for vocab in (OPT_VOCAB, LLAMA3_VOCAB):
        results = {}
        for loss in ("plain", "fused", "recompute"):
            argv = ["--variant", "full", *shape, *forwarded, "--vocab", str(vocab), "--loss", loss]
            r = results[loss] = run_in_subprocess(argv)
            print(f"{vocab:>8} {loss:<10}{r['peak_bytes'] / 2**20:>27.1f}MiB{r['step_s']:>9.3f}"
                  f"{r['step_cpu_s']:>9.3f}{r['loss']:>9.4f}")  # fmt: skip
        plain = results["plain"]
        summary.append(
            f"{vocab}: "
            + " ".join(
                f"{m}/plain peak={results[m]['peak_bytes'] / plain['peak_bytes']:.2f} "
                f"speed={plain['step_s'] / results[m]['step_s']:.2f} "
                f"cpu_speed={plain['step_cpu_s'] / results[m]['step_cpu_s']:.2f}"
                for m in ("fused", "recompute")
            )
        )
    print("; ".join(summary))


def main() -> None:
    args = parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    if args.chunked_loss:
        compare_losses(args)
        return
    forwarded = sys.argv[1:]
    results = {name: run_in_subprocess(["--variant", name, *forwarded]) for name in VARIANTS}
    what = "GPU max allocated" if args.device.startswith("cuda") else "CPU RSS growth"
    print(f"model: OPT-shaped hidden {args.hidden_size}, {args.num_layers} layers, vocab {args.vocab}; "
          f"batch {args.batch_size} x {args.seq_len} tokens; device {args.device}")  # fmt: skip
    print(f"{'variant':<9}{'trainable':>12}{'peak (' + what + ')':>30}{'step s':>9}")
    for name, r in results.items():
        print(
            f"{name:<9}{r['trainable_params']:>12,}{r['peak_bytes'] / 2**20:>27.1f}MiB{r['step_s']:>9.3f}"
        )
    full = results["full"]
    print(
        "step time: "
        + " ".join(
            f"{n}/full={results[n]['step_s'] / full['step_s']:.2f}" for n in ("lora", "lora_gc")
        )
    )
    print(
        " ".join(
            f"{n}/full={results[n]['peak_bytes'] / full['peak_bytes']:.2f}"
            for n in ("lora", "lora_gc")
        )
    )


if __name__ == "__main__":
    main()
