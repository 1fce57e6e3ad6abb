"""Packing with flex_attention: each packed example gets exactly its own logits and loss, and
`auto` picks it on a GPU without FlashAttention-2, where it can train."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import (
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from utils.cli.parse import parse_args
from utils.cli.validate import validate
from utils.data.collate import MODEL_INPUTS, collate
from utils.data.config import BatchConfig
from utils.data.loaders import build_train_loader
from utils.data.packing import collate_packed, pack_layout
from utils.demo.tiny import build_opt_model
from utils.distributed import DistInfo
from utils.errors import ConfigError
from utils.model.attention import flex_attention_problems, resolve_attention
from utils.model.config import ModelConfig
from utils.model.load import build_model, load_model_config, padded_vocab_size
from utils.model.loss import token_nll

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

ROWS = [
    {"input_ids": [5, 9, 14, 22, 31], "loss_spans": [[2, 5]]},
    {"input_ids": [8, 40, 41, 42, 43, 44, 45, 46, 47], "loss_spans": [[2, 4], [6, 9]]},
    {"input_ids": [60, 61, 62, 63], "loss_spans": [[1, 4]]},
]
NO_FLASH = "ModuleNotFoundError: No module named 'flash_attn'"


@pytest.fixture
def uncompiled_flex(monkeypatch):
    """transformers compiles flex_attention at its first call (about 10 s on a CPU); the same
    function uncompiled computes the same values, so these tests run it as it is."""
    import transformers.integrations.flex_attention as hf_flex
    from torch.nn.attention.flex_attention import flex_attention

    def uncompiled(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", uncompiled)


def saved_model(model_type: str, tokenizer, folder) -> str:
    """A tiny model of `model_type` saved with `tokenizer`, as --model_name_or_path takes it."""
    small = {
        "vocab_size": padded_vocab_size(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention, as in most LLaMA-like models
    }
    torch.manual_seed(0)
    if model_type == "opt":
        model = build_opt_model(tokenizer, hidden_size=32)
    elif model_type == "llama":
        model = LlamaForCausalLM(LlamaConfig(**small))
    elif model_type == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**small))
    else:
        model = MistralForCausalLM(MistralConfig(**small, sliding_window=None))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("model_type", ["opt", "llama", "qwen2", "mistral"])
def test_flex_packed_examples_get_exactly_their_own_logits_and_loss(
    model_type, tiny_tokenizer, tmp_path, uncompiled_flex
):
    cfg = ModelConfig(model_name_or_path=saved_model(model_type, tiny_tokenizer, tmp_path))
    model = build_model(
        cfg, load_model_config(cfg), tiny_tokenizer, attention="flex_attention"
    ).eval()
    pad = tiny_tokenizer.pad_token_id
    # Two packs of 14 and 4 tokens: the second row ends in 12 pad tokens.
    batch = collate_packed(
        [ROWS[:2], ROWS[2:]], pad_token_id=pad, loss_on="response", mask_dtype=None
    )
    assert "attention_mask" not in batch  # only the restarting position ids
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, use_cache=False).logits
        packed_loss = token_nll(logits, batch["labels"], fp32=True)
        model.set_attn_implementation("sdpa")  # the reference: each example on its own
        for b, pack in enumerate([ROWS[:2], ROWS[2:]]):
            start = 0
            for row in pack:
                alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
                end = start + len(row["input_ids"])
                torch.testing.assert_close(logits[b, start:end], alone, atol=1e-5, rtol=1e-5)
                start = end
        padded = collate(ROWS, pad_token_id=pad, loss_on="response")
        inputs = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
        alone_loss = token_nll(model(**inputs).logits, padded["labels"], fp32=True)
    assert packed_loss[1] == alone_loss[1]
    torch.testing.assert_close(packed_loss[0], alone_loss[0], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention trains on CUDA only")
@pytest.mark.parametrize("model_type", ["opt", "llama"])
def test_on_a_gpu_flex_packed_gradients_equal_separate_ones(model_type, tiny_tokenizer, tmp_path):
    """What a CPU cannot check: FlexAttention's compiled kernels and its backward pass. The
    packed batch's loss gradients equal those of the same rows padded apart under sdpa."""
    cfg = ModelConfig(model_name_or_path=saved_model(model_type, tiny_tokenizer, tmp_path))
    config = load_model_config(cfg)
    model = build_model(cfg, config, tiny_tokenizer, attention="flex_attention").cuda()
    pad = tiny_tokenizer.pad_token_id

    def gradients(batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = {k: batch[k].cuda() for k in MODEL_INPUTS if k in batch}
        nll, _ = token_nll(model(**inputs).logits, batch["labels"].cuda(), fp32=True)
        nll.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad()
        return nll.detach(), grads

    packs = [ROWS[:2], ROWS[2:]]
    packed = gradients(collate_packed(packs, pad_token_id=pad, loss_on="all", mask_dtype=None))
    model.set_attn_implementation("sdpa")
    alone = gradients(collate(ROWS, pad_token_id=pad, loss_on="all"))
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-3)


def test_flex_batches_carry_position_ids_and_no_mask():
    loader = build_train_loader(
        Dataset.from_list(ROWS * 3),
        BatchConfig(packing=True, loss_on="all"),
        micro_batch=2,
        max_seq_len=16,
        pad_token_id=1,
        seed=0,
        rank=0,
        world_size=1,
        mask_dtype=torch.float32,
        pack_layout=pack_layout("flex_attention"),
        on_gpu=False,
    )
    batches = list(loader)
    assert all("attention_mask" not in b and "position_ids" in b for b in batches)
    assert sorted(n for b in batches for n in b["seq_lens"].tolist()) == sorted([5, 9, 4] * 3)
    assert pack_layout(None) == "mask" and pack_layout("flash_attention_2") == "flat"


def test_auto_packs_with_flex_on_a_gpu_where_flash_attn_does_not_import():
    gpu = {"packing": True, "on_cuda": True, "dtype": "bf16", "attention_dropout": 0.0}
    attention, why = resolve_attention("auto", model_type="opt", flash_error=NO_FLASH, **gpu)
    assert attention == "flex_attention" and NO_FLASH in why
    assert resolve_attention("auto", model_type="qwen2", flash_error=None, **gpu)[0] == (
        "flash_attention_2"
    )
    fp32 = {**gpu, "dtype": "fp32"}  # FlashAttention-2 computes in 16 bits only; flex in any
    assert resolve_attention("auto", model_type="llama", flash_error=None, **fp32)[0] == (
        "flex_attention"
    )
    # Where flex_attention cannot keep examples apart or train, the 4D mask stays, and why.
    attention, why = resolve_attention("auto", model_type="gpt2", flash_error=NO_FLASH, **gpu)
    assert attention is None and "no flex_attention for model type 'gpt2'" in why
    dropout = {**gpu, "attention_dropout": 0.1}
    attention, why = resolve_attention("auto", model_type="opt", flash_error=NO_FLASH, **dropout)
    assert attention is None and "no attention dropout" in why
    cpu = {**gpu, "on_cuda": False}
    assert resolve_attention("auto", model_type="opt", flash_error=NO_FLASH, **cpu)[0] is None


def test_validation_refuses_flex_attention_where_it_cannot_train(tiny_model_dir, tmp_path):
    args = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "out")]
    flex = ["--attn_implementation", "flex_attention", "--packing", "--dropout", "0.1"]
    with pytest.raises(ConfigError) as refused:
        validate(parse_args([*args, *flex]), CPU)  # on this CPU, with attention dropout
    assert "flex_attention trains only on a CUDA GPU" in str(refused.value)
    assert "no attention dropout" in str(refused.value) and "drop --dropout" in str(refused.value)
    [gpt2] = flex_attention_problems("flex_attention", on_cuda=True, config=GPT2Config())
    assert "no flex_attention for model type 'gpt2'; use sdpa" in gpt2
