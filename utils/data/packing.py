"""Sequence packing: several examples per row, each attending only to itself.

A packed row concatenates examples; position ids restart at 0 for each, and something must
keep attention inside each example (restarting position ids alone do not), so every example
gets exactly the logits it would get alone. Three ways, one per kind of attention kernel
(`pack_layout` decides which, from the attention implementation the run resolved):

- "mask": a 4D additive block-diagonal causal mask (`collate_packed`), which sdpa and eager
  take as-is; every score is computed, then masked; memory quadratic in the row length.
- "positions": the same rows without a mask (`collate_packed` with no mask dtype); for
  flex_attention the model builds a block mask from the restarting position ids
  (utils/model/document_mask.py) and skips the blocks between examples.
- "flat": a micro-batch's packs concatenated into one row without padding (`collate_flat`),
  with the boundaries (`cu_seq_lens_*`, as transformers' DataCollatorWithFlattening passes
  them) for FlashAttention-2's variable-length path; attention memory linear in the length.

Packing is allowed only for the model types and attention implementations below, checked to
isolate examples (tests/data/test_packing.py and tests/model/test_flex_attention.py compare packed and
separate logits).
"""

from __future__ import annotations

import bisect

import torch

from utils.arithmetic import round_up
from utils.data.collate import PAD_MULTIPLE
from utils.data.common import IGNORE_INDEX
from utils.data.labels import build_labels

MASK_ATTENTION = ("eager", "sdpa")  # take the 4D mask
FLEX_ATTENTION = "flex_attention"  # takes the block mask built from position ids
# Model types whose transformers code passes a prepared 4D mask (a tensor or FlexAttention's
# BlockMask) through unchanged and takes position_ids, with the attention implementations
# verified for each. GPT-2 has no flex_attention in transformers.
PACKING_SUPPORT = {
    "opt": (*MASK_ATTENTION, FLEX_ATTENTION),
    "llama": (*MASK_ATTENTION, FLEX_ATTENTION),
    "mistral": (*MASK_ATTENTION, FLEX_ATTENTION),
    "qwen2": (*MASK_ATTENTION, FLEX_ATTENTION),
    "gpt2": MASK_ATTENTION,
}
# Attention implementations that take per-example boundaries from `collate_flat`'s
# cu_seq_lens_* (transformers passes them to flash_attn_varlen_func), for the same model
# types, whose layers forward these keyword arguments to the attention function.
VARLEN_ATTENTION = ("flash_attention_2",)


def pack_layout(attention: str | None) -> str:
    """How packed rows reach a model running `attention` (None: transformers' default, sdpa
    or eager): "flat", "positions" or "mask" (see the module's docstring)."""
    if attention in VARLEN_ATTENTION:
        return "flat"
    return "positions" if attention == FLEX_ATTENTION else "mask"


def packing_problems(model_type: str, attn_implementation: str | None) -> list[str]:
    """Why packing cannot isolate examples for this model, or [] when it can.

    `attn_implementation` None: transformers' default (sdpa, else eager), which takes a mask.
    """
    supported = PACKING_SUPPORT.get(model_type)
    if supported is None:
        return [
            f"--packing is not supported for model type {model_type!r}: examples could attend "
            f"to each other. Supported: {', '.join(sorted(PACKING_SUPPORT))}; "
            "or drop --packing (length-grouped batches already avoid most padding)."
        ]
    allowed = supported + VARLEN_ATTENTION
    if attn_implementation is not None and attn_implementation not in allowed:
        return [
            f"--packing with model type {model_type!r} needs attention that keeps examples "
            f"apart ({', '.join(allowed)}); this run uses {attn_implementation!r}. Pass "
            "--attn_implementation sdpa, or drop --packing."
        ]
    return []


def pack_rows(lengths: list[int], max_len: int) -> list[list[int]]:
    """Group row indices into packs of at most `max_len` tokens (best fit decreasing).

    Longest rows first, each into the open pack with the least room that still fits it;
    this leaves very little room unused. Deterministic; rows within a pack keep index order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free tokens, pack number) of open packs
    for i in order:
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at < len(room):
            free, pack = room.pop(at)
        else:
            free, pack = max_len, len(packs)
            packs.append([])
        packs[pack].append(i)
        if free - lengths[i] > 0:
            bisect.insort(room, (free - lengths[i], pack))
    return [sorted(p) for p in packs]


def collate_packed(
    packs: list[list[dict]],
    *,
    pad_token_id: int,
    loss_on: str,
    mask_dtype: torch.dtype | None,
    multiple: int = PAD_MULTIPLE,
) -> dict[str, torch.Tensor]:
    """Packs (lists of rows) into one batch, padded to the longest pack rounded up to
    `multiple` (utils/data/collate.py `pad_multiple`).

    attention_mask: [B, 1, T, T] additive (0 where a token may attend, the dtype's minimum
    elsewhere), in the model's compute dtype so every attention kernel accepts it; none when
    `mask_dtype` is None (the "positions" layout). The pad tail forms its own block (its
    position ids restart at 0), so no query row is fully masked.
    """
    longest = max(sum(len(r["input_ids"]) for r in pack) for pack in packs)
    width = round_up(longest, multiple)
    batch = len(packs)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    segment = torch.zeros((batch, width), dtype=torch.long)
    seq_lens = []
    for b, pack in enumerate(packs):
        start = 0
        for n, row in enumerate(pack):
            ids, end = row["input_ids"], start + len(row["input_ids"])
            input_ids[b, start:end] = torch.as_tensor(ids)
            row_labels = build_labels(row, loss_on)
            # An example's first token is never predicted from the example before it.
            row_labels[0] = IGNORE_INDEX
            labels[b, start:end] = torch.as_tensor(row_labels)
            position_ids[b, start:end] = torch.arange(len(ids))
            segment[b, start:end] = n
            if not row.get("filler"):
                seq_lens.append(len(ids))
            start = end
        position_ids[b, start:] = torch.arange(width - start)
        segment[b, start:] = len(pack)
    packed = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "labels": labels,
        "seq_lens": torch.tensor(seq_lens, dtype=torch.long),
    }
    if mask_dtype is not None:
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        allowed = (segment[:, :, None] == segment[:, None, :]) & causal  # [B, T, T]
        mask = torch.zeros((batch, 1, width, width), dtype=mask_dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(mask_dtype).min)
        packed["attention_mask"] = mask
    return packed


def collate_flat(packs: list[list[dict]], *, loss_on: str) -> dict:
    """Packs (lists of rows) concatenated into one row [1, N]: no padding, no mask.

    Each example's position ids restart at 0 and its first label is ignored (it is never
    predicted from the example before it), as in `collate_packed`; `cu_seq_lens_q/k`
    (int32 [examples + 1], cumulative lengths) and `max_length_q/k` (an int) tell the
    attention kernel where examples start, so none attends to another.
    """
    rows = [row for pack in packs for row in pack]
    lengths = [len(row["input_ids"]) for row in rows]
    input_ids, labels, position_ids = [], [], []
    for row in rows:
        input_ids += row["input_ids"]
        row_labels = build_labels(row, loss_on)
        row_labels[0] = IGNORE_INDEX
        labels += row_labels
        position_ids += range(len(row["input_ids"]))
    boundaries = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "cu_seq_lens_q": boundaries,
        "cu_seq_lens_k": boundaries,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
        "seq_lens": torch.tensor(
            [n for n, row in zip(lengths, rows, strict=True) if not row.get("filler")],
            dtype=torch.long,
        ),
    }
