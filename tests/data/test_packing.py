"""Packing: examples share a row but never attend to each other, and the loss is unchanged."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import (
    AttentionInterface,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from utils.data.collate import MODEL_INPUTS, collate
from utils.data.config import BatchConfig
from utils.data.loaders import build_train_loader
from utils.data.packing import (
    PACKING_SUPPORT,
    collate_flat,
    collate_packed,
    pack_rows,
    packing_problems,
)
from utils.demo.tiny import build_opt_model
from utils.model.loss import token_nll

ROWS = [
    {"input_ids": [5, 9, 14, 22, 31], "loss_spans": [[2, 5]]},
    {"input_ids": [8, 40, 41, 42, 43, 44, 45, 46, 47], "loss_spans": [[2, 4], [6, 9]]},
    {"input_ids": [60, 61, 62, 63], "loss_spans": [[1, 4]]},
]


def small_model(model_type: str, tokenizer):
    # Llama covers the rotary family (mistral, qwen2 share its attention and mask code).
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    if model_type == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=128, num_attention_heads=4, **small))
    if model_type == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4))
    return build_opt_model(tokenizer)


def test_packs_hold_every_row_once_within_max_len():
    lengths = torch.randint(1, 200, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    packs = pack_rows(lengths, 256)
    assert sorted(i for p in packs for i in p) == list(range(500))
    assert all(sum(lengths[i] for i in p) <= 256 for p in packs)
    assert len(packs) <= 1.05 * sum(lengths) / 256 + 1  # nearly no room left unused


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", ["opt", "llama", "gpt2"])
def test_packed_examples_get_exactly_their_own_logits(model_type, attn, tiny_tokenizer):
    model = small_model(model_type, tiny_tokenizer)
    model.config._attn_implementation = attn
    model.eval()
    batch = collate_packed([ROWS], pad_token_id=1, loss_on="all", mask_dtype=torch.float32)
    assert batch["input_ids"].shape == (1, 24)  # 18 tokens, padded to a multiple of 8
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits[0]
        start = 0
        for row in ROWS:
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            end = start + len(row["input_ids"])
            assert torch.allclose(packed[start:end], alone, atol=1e-5)
            start = end


@pytest.mark.parametrize("loss_on", ["all", "response"])
def test_packed_loss_equals_separate_loss(loss_on, tiny_tokenizer):
    model = build_opt_model(tiny_tokenizer).eval()
    with torch.no_grad():
        b = collate_packed(
            [ROWS[:2], ROWS[2:]], pad_token_id=1, loss_on=loss_on, mask_dtype=torch.float32
        )
        inputs = {k: b[k] for k in ("input_ids", "attention_mask", "position_ids")}
        packed = token_nll(model(**inputs).logits, b["labels"], fp32=True)
        p = collate(ROWS, pad_token_id=1, loss_on=loss_on)
        logits = model(input_ids=p["input_ids"], attention_mask=p["attention_mask"]).logits
        padded = token_nll(logits, p["labels"], fp32=True)
    assert packed[1] == padded[1]
    assert torch.allclose(packed[0], padded[0], rtol=1e-5)


def test_bf16_mask_uses_the_compute_dtype():
    mask = collate_packed([ROWS], pad_token_id=1, loss_on="all", mask_dtype=torch.bfloat16)[
        "attention_mask"
    ]
    assert mask.dtype == torch.bfloat16 and mask.shape == (1, 1, 24, 24)
    assert mask[0, 0, 6, 4] == torch.finfo(torch.bfloat16).min  # 2nd example cannot see the 1st
    assert mask[0, 0, 6, 5] == 0


def test_packing_loader_trains_every_row_once():
    dataset = Dataset.from_list(ROWS * 5)
    loader = build_train_loader(
        dataset,
        BatchConfig(packing=True, loss_on="all"),
        micro_batch=2,
        max_seq_len=32,
        pad_token_id=1,
        seed=0,
        rank=0,
        world_size=1,
        mask_dtype=torch.float32,
        on_gpu=False,
    )
    lengths = sorted(n for b in loader for n in b["seq_lens"].tolist())
    assert lengths == sorted([5, 9, 4] * 5)
    assert all(b["input_ids"].shape[1] <= 32 for b in loader)


def test_refuses_models_and_attention_that_cannot_isolate_examples():
    assert packing_problems("opt", "sdpa") == []
    assert packing_problems("opt", None) == []
    [unknown] = packing_problems("t5", None)
    assert "--packing" in unknown and "opt" in unknown
    # FlashAttention-2 takes per-example boundaries instead of a mask (collate_flat).
    assert packing_problems("llama", "flash_attention_2") == []
    assert packing_problems("llama", "flex_attention") == []  # a block mask from positions
    [no_flex] = packing_problems("gpt2", "flex_attention")  # GPT-2 has no flex_attention
    assert "'flex_attention'" in no_flex and "--attn_implementation sdpa" in no_flex
    assert set(PACKING_SUPPORT) >= {"opt", "llama", "gpt2"}


def test_flat_packs_concatenate_examples_with_their_boundaries():
    filler = {**ROWS[2], "filler": True}  # a rank with no row left trains a weightless copy
    b = collate_flat([ROWS[:2], [filler]], loss_on="response")
    assert b["input_ids"].tolist() == [[5, 9, 14, 22, 31, 8, 40, 41, 42, 43, 44, 45, 46, 47,
                                        60, 61, 62, 63]]  # fmt: skip
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3]]
    ignore = -100  # prompts, every example's first token, the filler row
    assert b["labels"].tolist() == [[ignore, ignore, 14, 22, 31, ignore, ignore, 41, 42,
                                     ignore, ignore, 45, 46, 47] + [ignore] * 4]  # fmt: skip
    assert b["cu_seq_lens_q"].tolist() == b["cu_seq_lens_k"].tolist() == [0, 5, 14, 18]
    assert b["cu_seq_lens_q"].dtype == torch.int32  # what flash_attn_varlen_func takes
    assert b["max_length_q"] == b["max_length_k"] == 9
    assert b["seq_lens"].tolist() == [5, 9]
    assert "attention_mask" not in b  # no mask, no padding


def varlen_reference(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """What FlashAttention-2's variable-length path computes, in plain torch: causal
    attention inside each [cu_seq_lens_q[i], cu_seq_lens_q[i+1]) span, nothing across."""
    bounds = kwargs["cu_seq_lens_q"].tolist()  # KeyError: the model did not pass them on
    spans = []
    for a, b in itertools.pairwise(bounds):
        q, k, v = query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]
        spans.append(
            F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        )
    out = torch.cat(spans, dim=2)
    return out.transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("model_type", ["opt", "llama", "gpt2"])
def test_flat_packs_give_each_example_its_own_logits(model_type, tiny_tokenizer):
    """The boundaries reach the attention kernel: one that honours them (as FlashAttention-2's
    varlen path does on a GPU) gives every example exactly the logits it gets alone."""
    AttentionInterface.register("varlen_reference", varlen_reference)
    model = small_model(model_type, tiny_tokenizer).eval()
    model.set_attn_implementation("varlen_reference")
    batch = collate_flat([ROWS[:2], ROWS[2:]], loss_on="all")
    with torch.no_grad():
        flat = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits[0]
        model.set_attn_implementation("sdpa")
        start = 0
        for row in ROWS:
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            end = start + len(row["input_ids"])
            assert torch.allclose(flat[start:end], alone, atol=1e-5)
            start = end


def test_flat_packing_loader_puts_a_micro_batch_in_one_row():
    loader = build_train_loader(
        Dataset.from_list(ROWS * 5),
        BatchConfig(packing=True, loss_on="all"),
        micro_batch=2,
        max_seq_len=32,
        pad_token_id=1,
        seed=0,
        rank=0,
        world_size=1,
        mask_dtype=torch.float32,
        pack_layout="flat",
        on_gpu=False,
    )
    batches = list(loader)
    assert all(b["input_ids"].shape[0] == 1 and "attention_mask" not in b for b in batches)
    assert all(b["input_ids"].shape[1] == b["seq_lens"].sum() for b in batches)  # no padding
    assert sorted(n for b in batches for n in b["seq_lens"].tolist()) == sorted([5, 9, 4] * 5)
