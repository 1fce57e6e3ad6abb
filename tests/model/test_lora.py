"""LoRA on PEFT: where adapters go, what trains, merging, adapters, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from utils.demo.tiny import build_opt_model
from utils.errors import UserError
from utils.model.config import LoraConfig
from utils.model.lora import (
    apply_lora,
    is_lora_parameter,
    lora_state_dict,
    merged_state_dict,
    resolve_lora_targets,
)

OPT_LAYER_LINEARS = {"self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"}
OPT_LAYER_LINEARS |= {"self_attn.out_proj", "fc1", "fc2"}


def _batch(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _perturb_lora(model, seed: int = 1) -> None:
    """Give the adapters non-zero B so merging has something to fold in."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_lora_parameter(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg)


def _tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4))


def test_lora_wraps_every_decoder_linear_and_nothing_else(tiny_tokenizer):
    model = apply_lora(build_opt_model(tiny_tokenizer), LoraConfig(lora_dim=4))
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    expected = {
        f"base_model.model.model.decoder.layers.{i}.{s}"
        for i in range(2)
        for s in OPT_LAYER_LINEARS
    }
    assert wrapped == expected
    ranks = {p.shape[0] for n, p in model.named_parameters() if ".lora_A." in n}
    assert ranks == {4}
    assert model.peft_config["default"].lora_alpha / 4 == pytest.approx(1 / 4)


def test_custom_scope_narrows_the_wrapped_layers(tiny_tokenizer):
    cfg = LoraConfig(lora_dim=2, lora_module_name="layers.1.fc")
    model = apply_lora(build_opt_model(tiny_tokenizer), cfg)
    wrapped = {
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if hasattr(m, "lora_A")
    }
    assert wrapped == {"model.decoder.layers.1.fc1", "model.decoder.layers.1.fc2"}


@pytest.mark.parametrize(
    ("build", "scope"), [(_tiny_llama, "model.layers."), (_tiny_gpt2, "transformer.h.")]
)
def test_default_scope_falls_back_to_the_model_family(build, scope):
    model = build()
    targets = resolve_lora_targets(model, LoraConfig().lora_module_name)
    assert targets and all(scope in t for t in targets)
    assert "lm_head" not in targets


def test_scope_matching_nothing_lists_linear_layers(tiny_tokenizer):
    with pytest.raises(UserError) as err:
        apply_lora(
            build_opt_model(tiny_tokenizer), LoraConfig(lora_dim=4, lora_module_name="nope.")
        )
    assert "--lora_module_name 'nope.'" in str(err.value)
    assert "model.decoder.layers.0.self_attn.k_proj" in str(err.value)


def test_only_optimize_lora_freezes_the_base(tiny_tokenizer):
    only = apply_lora(
        build_opt_model(tiny_tokenizer), LoraConfig(lora_dim=4, only_optimize_lora=True)
    )
    both = apply_lora(build_opt_model(tiny_tokenizer), LoraConfig(lora_dim=4))
    assert {n for n, p in only.named_parameters() if p.requires_grad} == {
        n for n, _ in only.named_parameters() if is_lora_parameter(n)
    }
    assert all(p.requires_grad for p in both.parameters())


def test_disabled_lora_returns_the_model_untouched(tiny_tokenizer):
    model = build_opt_model(tiny_tokenizer)
    assert apply_lora(model, LoraConfig(lora_dim=0)) is model


@pytest.mark.parametrize("family", ["opt", "gpt2", "llama"])
def test_merged_state_dict_reproduces_lora_logits_in_a_plain_model(family, tiny_tokenizer):
    build = {
        "opt": lambda: build_opt_model(tiny_tokenizer),
        "gpt2": _tiny_gpt2,
        "llama": _tiny_llama,
    }[family]
    model = apply_lora(build(), LoraConfig(lora_dim=4)).eval()
    _perturb_lora(model)
    ids = _batch(64)
    with torch.no_grad():
        lora_logits = model(input_ids=ids).logits
        plain = build().eval()
        plain.load_state_dict(merged_state_dict(model), strict=False)
        merged_logits = plain(input_ids=ids).logits
        again = model(input_ids=ids).logits  # merging did not touch the training model
    assert not torch.allclose(merged_logits, build().eval()(input_ids=ids).logits)
    torch.testing.assert_close(merged_logits, lora_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, lora_logits)
    assert not any("lora" in k or "base_layer" in k for k in merged_state_dict(model))


def test_merged_state_dict_covers_every_plain_weight(tiny_tokenizer):
    model = apply_lora(build_opt_model(tiny_tokenizer), LoraConfig(lora_dim=4))
    plain = build_opt_model(tiny_tokenizer)
    result = plain.load_state_dict(merged_state_dict(model), strict=False)
    assert not result.unexpected_keys
    # Only tied copies of the embedding may be absent (loading re-ties them).
    assert set(result.missing_keys) <= {"lm_head.weight"}


def test_saved_adapter_loads_back_with_peft(tmp_path, tiny_tokenizer):
    model = apply_lora(build_opt_model(tiny_tokenizer), LoraConfig(lora_dim=4)).eval()
    _perturb_lora(model)
    model.save_pretrained(str(tmp_path), state_dict=lora_state_dict(model))
    assert (tmp_path / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(build_opt_model(tiny_tokenizer), str(tmp_path)).eval()
    ids = _batch(64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_with_only_lora_trains_the_adapters(reentrant, tiny_tokenizer):
    model = build_opt_model(tiny_tokenizer)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model = apply_lora(model, LoraConfig(lora_dim=4, only_optimize_lora=True)).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = _batch(64)
    losses = []
    for _ in range(8):
        loss = _loss(model, ids)
        loss.backward()
        assert all(p.grad is not None for p in trainable)
        assert sum(p.grad.abs().sum() for p in trainable) > 0
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_lora_weights_get_the_lora_learning_rate(tiny_tokenizer):
    from utils.engine.config import TrainConfig
    from utils.engine.optim import build_param_groups

    lora = LoraConfig(lora_dim=4, lora_learning_rate=5e-4)
    model = apply_lora(build_opt_model(tiny_tokenizer), lora)
    groups = build_param_groups(model, TrainConfig(learning_rate=1e-3), lora)
    lora_ids = {id(p) for n, p in model.named_parameters() if is_lora_parameter(n)}
    for group in groups:
        is_lora = {id(p) in lora_ids for p in group["params"]}
        assert len(is_lora) == 1  # never a mix
        assert group["lr"] == (5e-4 if is_lora.pop() else 1e-3)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_lora_and_planner_flags_are_validated_together(tiny_model_dir):
    from utils.cli.parse import parse_args
    from utils.cli.validate import flag_problems

    cfg = parse_args(["--model_name_or_path", str(tiny_model_dir), "--save_lora_adapter",
                      "--gpu_memory_gb", "0", "--num_nodes", "0", "--estimate_memory"])  # fmt: skip
    problems = "\n".join(flag_problems(cfg, on_cuda=False, bf16_supported=False))
    assert "--save_lora_adapter needs LoRA" in problems
    assert "--gpu_memory_gb 0" in problems and "--num_nodes 0" in problems
    assert "--output_dir" not in problems  # the planner writes nothing
