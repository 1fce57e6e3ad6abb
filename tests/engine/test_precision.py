"""--dtype auto: native bf16 GPUs, fp16 below compute capability 8.0, bf16 on AMX CPUs only."""

from __future__ import annotations

import pytest
import torch

from utils.engine import precision
from utils.engine.precision import cpu_bf16_capability, cpu_features, detect_dtype, resolve_dtype

NO_BF16 = (False, "the CPU has no bf16 matrix units (no AMX-bf16)")
AMX = (True, "the CPU has AMX-bf16 (bf16 matrix units)")


@pytest.mark.parametrize("requested", ["fp32", "fp16", "bf16"])
def test_an_explicit_dtype_is_kept_everywhere(requested):
    assert resolve_dtype(requested, True, (7, 0), NO_BF16)[0] == requested
    assert resolve_dtype(requested, False, None, AMX)[0] == requested


@pytest.mark.parametrize(
    ("capability", "dtype"),
    [((9, 0), "bf16"), ((8, 0), "bf16"), ((8, 6), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16"),
     (None, "fp16")],
)  # fmt: skip
def test_auto_on_cuda_wants_native_bf16(capability, dtype):
    chosen, why = resolve_dtype("auto", True, capability, AMX)  # the CPU plays no part
    assert chosen == dtype
    if capability == (7, 0):  # V100: torch.cuda.is_bf16_supported() says True (emulated)
        assert "7.0" in why and "below 8.0" in why


def test_auto_on_cpu_is_bf16_only_with_amx():
    assert resolve_dtype("auto", False, None, AMX) == (
        "bf16",
        "bf16: the CPU has AMX-bf16 (bf16 matrix units); bf16 trains faster than fp32 there",
    )
    chosen, why = resolve_dtype("auto", False, None, NO_BF16)
    assert chosen == "fp32" and "no AMX-bf16" in why and "--dtype bf16" in why


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        ({"amx_bf16": True, "avx512_bf16": True, "amx_usable": True}, True),
        ({"amx_bf16": True, "avx512_bf16": True, "amx_usable": False}, False),
        ({"amx_bf16": False, "avx512_bf16": True, "amx_usable": True}, False),
        ({"amx_bf16": False, "avx512_bf16": False, "amx_usable": True}, False),
    ],
)
def test_cpu_bf16_needs_usable_amx(features, expected):
    has_bf16, why = cpu_bf16_capability(features)
    assert has_bf16 is expected
    if not features["amx_usable"]:
        assert "OS" in why


def test_features_from_get_capabilities(monkeypatch):
    caps = {"amx_bf16": True, "amx_tile": True, "avx512_bf16": True, "avx2": True}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps, raising=False)
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: False, raising=False)
    assert cpu_features() == {"amx_bf16": True, "avx512_bf16": True, "amx_usable": False}


def test_features_from_older_private_probes(monkeypatch):
    """torch < 2.10: no get_capabilities; probes under torch.cpu or torch._C._cpu."""
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported", "_init_amx"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    c_cpu = torch._C._cpu
    monkeypatch.setattr(c_cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(c_cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(c_cpu, "_init_amx", lambda: True, raising=False)
    assert cpu_features() == {"amx_bf16": True, "avx512_bf16": False, "amx_usable": True}
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported", "_init_amx"):
        monkeypatch.delattr(c_cpu, name, raising=False)
    assert cpu_features()["amx_bf16"] is False  # nothing to ask: no bf16 claimed


def test_detect_dtype_probes_this_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_bf16_capability", lambda: AMX)
    assert detect_dtype("auto")[0] == "bf16"
    monkeypatch.setattr(precision, "cpu_bf16_capability", lambda: NO_BF16)
    assert detect_dtype("auto")[0] == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert detect_dtype("auto")[0] == "fp16"
