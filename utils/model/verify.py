"""Check the published model folder against the model that was trained.

DeepSpeed-Chat users have shipped folders of empty ZeRO-3 weights without noticing.
After the final save, rank 0 reloads the folder with `from_pretrained` (on the CPU, in
fp32, so it needs no accelerator memory) and compares its logits on one eval batch with
the trained model's; a mismatch fails the run instead of leaving a bad artifact.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from utils.distributed import DistInfo, all_reduce_max, print_rank_0

# Largest |saved - trained| logit difference accepted, relative to the largest |logit|:
# fp32 differs only by kernel choice (CPU vs accelerator); fp16/bf16 training weights are
# compared with an fp32 reload, so rounding of the activations is allowed for.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


class SavedModelMismatch(RuntimeError):
    """The folder on disk does not reproduce the trained model."""


@torch.no_grad()
def verify_saved_model(
    engine, output_dir: str, eval_loader: DataLoader, dist: DistInfo, trust_remote_code: bool
) -> None:
    # Any rows show a bad copy; a rank without eval rows still joins the ZeRO-3 forward.
    batch = next(iter(eval_loader), None) or _probe_batch()
    batch = {k: v[:1] for k, v in batch.items()}  # one row: the fp32 CPU reload stays cheap
    inputs = {k: v.to(dist.device) for k, v in batch.items() if k != "labels"}
    engine.eval()
    logits = engine(**inputs, use_cache=False).logits
    engine.train()
    # The precision the logits were computed in: the weights' under DeepSpeed's fp16/bf16,
    # the autocast dtype with fp32 weights under torch.autocast.
    dtype, trained = logits.dtype, logits.float().cpu()
    problem = None
    if dist.is_main:
        problem = _compare(output_dir, batch, trained, dtype, trust_remote_code)
    if all_reduce_max(1 if problem else 0, dist.device):
        raise SavedModelMismatch(
            problem or f"the model saved in {output_dir} failed verification on rank 0"
        )
    print_rank_0(f"verified {output_dir}: from_pretrained reproduces the trained model's logits")


def _compare(
    output_dir: str, batch: dict, trained: torch.Tensor, dtype: torch.dtype, trust_remote_code: bool
) -> str | None:
    saved_model = AutoModelForCausalLM.from_pretrained(
        output_dir, dtype=torch.float32, trust_remote_code=trust_remote_code
    ).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    saved = saved_model(**inputs, use_cache=False).logits.float()
    real = batch["attention_mask"].bool()  # padding positions are never trained or used
    diff = (saved - trained)[real].abs().max().item()
    scale = max(trained[real].abs().max().item(), 1.0)
    tolerance = TOLERANCE.get(dtype, 1e-3)
    if diff <= tolerance * scale:
        return None
    return (
        f"the model saved in {output_dir} does not reproduce the trained model: its logits "
        f"differ by up to {diff:.3g} (allowed {tolerance * scale:.3g}) on an eval batch. The "
        "folder is not a faithful copy (were ZeRO-3 weights gathered?); do not use it. The "
        "last checkpoint, if any, still holds the trained state."
    )


def _probe_batch() -> dict[str, torch.Tensor]:
    ids = torch.arange(1, 9).unsqueeze(0)  # [1, 8], ids every vocabulary has
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
