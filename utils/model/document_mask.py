"""FlexAttention on packed rows: each example attends only to itself, and masked blocks are skipped.

A packed row for flex_attention carries no attention mask, only position ids that restart
at 0 where each example starts (utils/data/packing.py, `collate_packed` without a mask).
From them `document_causal_mask` builds a BlockMask (causal, within one example): a
compressed mask FlexAttention uses to skip every 128x128 block of scores that lies wholly
between two examples, where sdpa with a 4D mask computes them all and then masks them.

transformers 5 builds such a mask itself from restarting position ids for some model types
(LLaMA, Qwen2, Mistral), but OPT's decoder never passes the position ids to its mask
builder, so its examples would attend to each other. `mask_documents` hands the decoder
this mask instead, for every model type alike; a prepared 4D mask is passed through to
the attention layers as-is (tests/model/test_flex_attention.py checks every supported type).
"""

from __future__ import annotations

import torch


def document_causal_mask(position_ids: torch.Tensor):
    """BlockMask [B, 1, T, T]: token q sees token k when k <= q and both lie in one example.

    position_ids: [B, T], 0 where each example starts (a padding tail restarts at 0 too, so
    it forms an example of its own, whose labels are ignored).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    example = (position_ids == 0).cumsum(-1)  # [B, T]: which example each token belongs to

    def same_example_causal(b, h, q, k):
        return (example[b, q] == example[b, k]) & (k <= q)

    batch, length = position_ids.shape
    return create_block_mask(
        same_example_causal, batch, None, length, length, device=position_ids.device
    )


def mask_documents(model: torch.nn.Module) -> None:
    """Make `model`'s decoder attend within examples when a call passes position ids and no
    mask (a packed batch), through a forward pre-hook: every caller (the engine, a PEFT
    wrapper, evaluation) goes through it. Calls with a mask or a cache are left alone."""

    def add_mask(module, args, kwargs):
        cached = kwargs.get("use_cache") or any(
            kwargs.get(name) is not None for name in ("cache", "past_key_values")
        )
        positions = kwargs.get("position_ids")
        if kwargs.get("attention_mask") is None and positions is not None and not cached:
            kwargs["attention_mask"] = document_causal_mask(positions)
        return args, kwargs

    model.get_decoder().register_forward_pre_hook(add_mask, with_kwargs=True)
