"""flash-attn and Liger-Kernel count as present only where they import, once per process, and
Liger's fused loss is not used at ZeRO-3 (it would hold a whole weight-sized gradient)."""

from __future__ import annotations

import sys

import pytest

from utils.demo.tiny import build_opt_model
from utils.model.attention import flash_attention_problems, flash_attn_error, resolve_attention
from utils.model.kernels import LIGER_LOSS, import_error, loss_kernel
from utils.model.loss import choose_loss_path

BROKEN = "raise OSError('libcudart.so.11.0: cannot open shared object file')\n"


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """fake(module, source): an importable `module` on sys.path running `source` when imported
    (its parent packages empty); import_error's answers and the modules are forgotten after."""
    known = set(sys.modules)
    monkeypatch.syspath_prepend(str(tmp_path))
    import_error.cache_clear()

    def fake(module: str, source: str = "") -> None:
        folder = tmp_path
        for package in module.split(".")[:-1]:
            folder = folder / package
            folder.mkdir(exist_ok=True)
            (folder / "__init__.py").touch()
        (folder / f"{module.split('.')[-1]}.py").write_text(source)

    yield fake
    import_error.cache_clear()
    for name in set(sys.modules) - known:
        del sys.modules[name]


def test_a_flash_attn_that_does_not_import_is_not_used(fake_packages, tmp_path):
    runs = tmp_path / "imported"
    fake_packages("flash_attn", f"open({str(runs)!r}, 'a').write('x')\n{BROKEN}")
    error = flash_attn_error()
    assert error == "OSError: libcudart.so.11.0: cannot open shared object file"
    assert flash_attn_error() == error and runs.read_text() == "x"  # imported once, not twice
    gpu = {"packing": True, "on_cuda": True, "dtype": "bf16", "attention_dropout": 0.0}
    attention, why = resolve_attention("auto", model_type="opt", flash_error=error, **gpu)
    assert attention == "flex_attention" and "libcudart" in why
    [problem] = flash_attention_problems("flash_attention_2", on_cuda=True, flash_error=error)
    assert "built for this torch" in problem and "libcudart" in problem


def test_a_flash_attn_that_imports_is_used(fake_packages):
    fake_packages("flash_attn")
    assert flash_attn_error() is None
    assert flash_attention_problems("flash_attention_2", on_cuda=True, flash_error=None) == []


def test_liger_only_on_cuda_where_it_imports_and_never_at_zero3(
    fake_packages, tiny_tokenizer, monkeypatch
):
    model = build_opt_model(tiny_tokenizer)
    # The loss path sizes its chunks from the GPU's memory: an 80 GB one, on this CPU.
    monkeypatch.setattr(
        "utils.model.loss.accelerator_memory", lambda kind: 80 * 2**30 if kind == "cuda" else None
    )

    def path(zero_stage: int, device_type: str = "cuda"):
        return choose_loss_path(
            model, "auto", zero_stage=zero_stage, device_type=device_type, fp32=False,
            compiled=False,
        )  # fmt: skip

    fake_packages(LIGER_LOSS)
    assert loss_kernel("cuda", "fused") == ("liger", "")
    assert path(zero_stage=2).kernel == "liger"
    assert path(zero_stage=2, device_type="cpu").kernel == "torch"
    zero3 = path(zero_stage=3)
    # Its gradients are computed in the forward: a whole, unpartitioned weight-sized tensor
    # held until the backward, which ZeRO-3's recompute mode exists to avoid.
    assert (zero3.kernel, zero3.mode) == ("torch", "recompute")
    assert "Liger-Kernel unused: it keeps a weight-sized gradient" in zero3.describe()


def test_a_liger_that_does_not_import_is_not_used(fake_packages):
    fake_packages(LIGER_LOSS, "raise RuntimeError('Triton was built for another CUDA')\n")
    assert loss_kernel("cuda", "fused") == ("torch", "")
