"""The chunked loss equals the plain loss (value, count and gradients) without the full logits."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

from tests.conftest import REPO
from tests.token_loss_worker import build_model
from utils.data.common import IGNORE_INDEX
from utils.model.chunk_size import (
    MAX_CHUNK_TOKENS,
    TILE,
    accelerator_memory,
    default_chunk_tokens,
)
from utils.model.chunked_loss import (
    causal_lm,
    chunked_loss_mode,
    chunked_loss_problem,
    chunked_nll,
    forward_chunked_nll,
    supports_chunked_loss,
)
from utils.model.loss import token_nll


def head_and_batch(dtype: torch.dtype, seed: int = 0):
    """A Linear head (with bias) over [3, 11, 16] hidden states; labels with ignored spans."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(16, 37).to(dtype)
    hidden = torch.randn(3, 11, 16).to(dtype).requires_grad_()
    labels = torch.randint(0, 37, (3, 11))
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, 7:] = IGNORE_INDEX  # padding
    return head, hidden, labels


def loss_and_grads(fn, head, hidden) -> tuple[torch.Tensor, int, list[torch.Tensor]]:
    hidden.grad = None
    head.zero_grad()
    nll, count = fn()
    nll.backward()
    return nll.detach(), count, [hidden.grad, head.weight.grad, head.bias.grad]


@pytest.mark.parametrize("mode", ["recompute", "fused"])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 64])  # 7 does not divide the 23 trained rows
def test_fp32_loss_and_gradients_equal_the_plain_loss(mode, chunk_tokens):
    head, hidden, labels = head_and_batch(torch.float32)
    plain = loss_and_grads(lambda: token_nll(head(hidden), labels, fp32=True), head, hidden)
    chunked = loss_and_grads(
        lambda: chunked_nll(hidden, head, labels, chunk_tokens, mode), head, hidden
    )
    assert chunked[1] == plain[1] == 23
    assert chunked[0].dtype == torch.float32
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-6, atol=1e-5)
    for got, expected in zip(chunked[2], plain[2], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert hidden.grad[2, 7:].abs().sum() == 0  # ignored positions get no gradient


@pytest.mark.parametrize("mode", ["recompute", "fused"])
def test_bf16_loss_is_the_fp32_sum_of_upcast_logits(mode):
    head, hidden, labels = head_and_batch(torch.bfloat16)
    plain = loss_and_grads(lambda: token_nll(head(hidden), labels, fp32=True), head, hidden)
    chunked = loss_and_grads(lambda: chunked_nll(hidden, head, labels, 7, mode), head, hidden)
    assert chunked[0].dtype == torch.float32  # a bf16 sum would round it
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-6, atol=1e-4)
    for got, expected in zip(chunked[2], plain[2], strict=True):
        assert got.dtype == torch.bfloat16
        # bf16 products (each chunk's, the plain loss's), summed in fp32: a rounding apart.
        scale = expected.float().abs().max()
        torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=2**-6 * scale)


def weight_grad(head, hidden, labels, chunk_tokens: int) -> torch.Tensor:
    head.zero_grad()
    nll, _ = chunked_nll(hidden, head, labels, chunk_tokens, "fused")
    nll.backward()
    return head.weight.grad.float()


def test_bf16_weight_gradient_over_many_chunks_is_as_exact_as_over_one():
    """Summed over 1,024 one-row chunks, a bf16 running sum drifted 17x further from the
    exact gradient than one chunk's product (3.5% against 0.2%): the sum is kept in fp32."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 97, bias=False).to(torch.bfloat16)
    hidden = torch.randn(4, 256, 64).to(torch.bfloat16)
    labels = torch.randint(0, 97, (4, 256))
    exact = weight_grad(head.float(), hidden.float(), labels, 1024)  # same values, in fp32
    head.bfloat16()
    one, many = (weight_grad(head, hidden, labels, chunk) - exact for chunk in (1024, 1))
    assert many.norm() < 2 * one.norm()


class WeightZeros(TorchDispatchMode):
    """Records ops that fill a tensor of `shape` with zeros."""

    FILLS = (torch.ops.aten.zeros_like, torch.ops.aten.zeros, torch.ops.aten.new_zeros,
             torch.ops.aten.zero_, torch.ops.aten.fill_)  # fmt: skip

    def __init__(self, shape) -> None:
        super().__init__()
        self.shape, self.seen = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in self.FILLS and tuple(getattr(out, "shape", ())) == self.shape:
            self.seen.append(func)
        return out


def test_no_weight_sized_zeros_per_micro_batch_unless_it_has_no_trained_rows():
    head, hidden, labels = head_and_batch(torch.float32)
    with WeightZeros(head.weight.shape) as zeros:
        nll, count = chunked_nll(hidden, head, labels, 7, "fused")
        nll.backward()
    assert count == 23 and not zeros.seen
    with WeightZeros(head.weight.shape) as zeros:  # a rank with nothing to train on
        nll, count = chunked_nll(hidden, head, torch.full_like(labels, IGNORE_INDEX), 7, "fused")
        nll.backward()
    assert count == 0 and zeros.seen  # zero gradients, so every rank reduces the same tensors


def test_chunks_are_tile_multiples_and_fill_a_gpus_share_of_memory(monkeypatch):
    for vocab in (512, 32000, 50272, 128256, 256000):
        cpu = default_chunk_tokens(vocab, None)
        assert cpu % TILE == 0 and (cpu * vocab * 4 <= 2**26 or cpu == TILE)
    h200, h100 = 141 * 10**9, 80 * 10**9
    assert default_chunk_tokens(50272, h200) >= default_chunk_tokens(50272, h100) >= 1400
    assert default_chunk_tokens(50272, h200) % TILE == 0  # a 1,400-token micro-batch: one chunk
    assert default_chunk_tokens(512, h200) == MAX_CHUNK_TOKENS
    assert accelerator_memory("cpu") is None
    # The GPU's memory is what torch reports at run time (forced here: this CPU has none).
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": h200})
    )
    assert accelerator_memory("cuda") == h200


class MatmulDtypes(TorchDispatchMode):
    """Records the input dtypes of every matrix product run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.dtypes |= {a.dtype for a in args if isinstance(a, torch.Tensor) and a.dim() == 2}
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["recompute", "fused"])
def test_under_autocast_the_projection_runs_in_bf16_and_fp32_weights_get_their_gradients(mode):
    """CPU bf16 trains through torch.autocast (fp32 weights): the chunked loss must compute
    the logits as autocast computes the plain loss's, and hand fp32 gradients back."""
    head, hidden, labels = head_and_batch(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = loss_and_grads(lambda: token_nll(head(hidden), labels, fp32=True), head, hidden)
        with MatmulDtypes() as matmuls:  # forward and backward
            chunked = loss_and_grads(
                lambda: chunked_nll(hidden, head, labels, 7, mode), head, hidden
            )
    assert matmuls.dtypes == {torch.bfloat16}  # every chunk's products, gradients' too
    fp32 = loss_and_grads(lambda: token_nll(head(hidden), labels, fp32=True), head, hidden)
    assert not torch.allclose(plain[0], fp32[0], rtol=1e-6, atol=0)  # autocast did round
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-6, atol=1e-4)
    for got, expected in zip(chunked[2], plain[2], strict=True):
        assert got.dtype == torch.float32
        scale = expected.abs().max()
        torch.testing.assert_close(got, expected, rtol=0, atol=2**-6 * scale)


def test_fp16_sum_does_not_overflow():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False).half()
    with torch.no_grad():
        head.weight.mul_(40)  # confident, wrong predictions: a large loss per token
    hidden = torch.randn(4, 600, 8).half()
    labels = torch.zeros(4, 600, dtype=torch.long)
    plain, _ = token_nll(head(hidden), labels, fp32=False)
    nll, count = chunked_nll(hidden, head, labels, 256)
    # Both sums are fp32: an fp16 one would overflow past 65,504.
    assert nll.dtype == torch.float32 and count == 4 * 599
    assert torch.isfinite(nll) and nll > 65504
    torch.testing.assert_close(nll, plain, rtol=1e-3, atol=0)


@pytest.mark.parametrize("mode", ["recompute", "fused"])
def test_model_with_tied_embeddings_gets_the_plain_gradients(mode):
    model = build_model()  # OPT: lm_head.weight is the input embedding
    assert model.lm_head.weight is model.get_input_embeddings().weight
    torch.manual_seed(1)
    ids = torch.randint(4, 128, (3, 13))
    labels = ids.clone()
    labels[1, 9:] = IGNORE_INDEX
    inputs = {"input_ids": ids, "attention_mask": (labels != IGNORE_INDEX).long()}

    def grads(fn):
        model.zero_grad()
        nll, count = fn()
        nll.backward()
        return nll.detach(), count, {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads(lambda: token_nll(model(**inputs).logits, labels, fp32=True))
    chunked = grads(lambda: forward_chunked_nll(model, inputs, labels, 5, mode))
    assert chunked[1] == plain[1]
    torch.testing.assert_close(chunked[0], plain[0])
    for name, expected in plain[2].items():
        torch.testing.assert_close(chunked[2][name], expected, rtol=1e-5, atol=1e-6)
    assert "forward" not in model.lm_head.__dict__  # the head is itself again afterwards
    assert model(**inputs).logits.shape == (3, 13, 128)


def test_wrapped_models_are_unwrapped_and_supported():
    from utils.model.config import LoraConfig
    from utils.model.lora import apply_lora

    model = build_model()
    peft_model = apply_lora(model, LoraConfig(lora_dim=4, lora_module_name="decoder.layers."))

    class Engine(torch.nn.Module):  # what matters of DeepSpeedEngine: .module and forward
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            return self.module(**kwargs)

    engine = Engine(peft_model)
    assert causal_lm(engine) is model and causal_lm(peft_model) is model
    assert supports_chunked_loss(engine)
    ids = torch.randint(4, 128, (2, 9))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    plain, _ = token_nll(peft_model(**inputs).logits, ids, fp32=True)
    chunked, _ = forward_chunked_nll(engine, inputs, ids, 4)
    torch.testing.assert_close(chunked, plain)


def tiny_on_meta(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_models_whose_logits_are_not_the_heads_output_fall_back():
    llama = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2,
    )  # fmt: skip
    assert chunked_loss_problem(tiny_on_meta(llama)) is None
    gemma2 = Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
    )  # fmt: skip
    assert "'gemma2'" in chunked_loss_problem(tiny_on_meta(gemma2))
    llama.final_logit_softcapping = 30.0  # a LLaMA-derived model that soft-caps its logits
    assert "final_logit_softcapping" in chunked_loss_problem(tiny_on_meta(llama))
    model = build_model()
    model.lm_head = torch.nn.Sequential(model.lm_head)
    assert "Sequential" in chunked_loss_problem(model)
    assert not supports_chunked_loss(model)


@pytest.mark.slow
def test_zero3_step_equals_zero0_step(tmp_path):
    """One SGD step of a tied-embedding OPT: ZeRO-3 with the chunked loss (the head's weight
    partitioned, gathered by DeepSpeed for the head's call) moves every weight as ZeRO-0
    with the plain loss does."""
    out = str(tmp_path / "steps.safetensors")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    cmd += [os.path.join(REPO, "tests", "chunked_loss_worker.py"), out]
    cmd += ["0-plain", "3-recompute"]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # never join an in-process test's group
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = load_file(out)
    reference = {k.split("/", 1)[1]: v for k, v in steps.items() if k.startswith("0-plain/")}
    start = build_model().state_dict()
    assert not torch.allclose(reference["model.decoder.embed_tokens.weight"],
                              start["model.decoder.embed_tokens.weight"], atol=1e-3)  # fmt: skip
    for name, expected in reference.items():
        torch.testing.assert_close(steps[f"3-recompute/{name}"], expected, rtol=1e-5, atol=1e-6)


def test_zero3_recomputes_and_other_stages_fuse():
    assert [chunked_loss_mode(stage) for stage in (0, 1, 2, 3)] == ["fused"] * 3 + ["recompute"]
