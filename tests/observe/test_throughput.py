"""Throughput figures: real tokens only, FLOPs with LoRA and checkpointing factors, MFU peaks."""

from __future__ import annotations

import math

import pytest
import torch

from utils.data.collate import collate
from utils.demo.tiny import build_opt_model
from utils.observe.throughput import (
    FlopShape,
    ThroughputMeter,
    build_flop_shape,
    format_throughput,
    lookup_peak_tflops,
    normalize_device_name,
)


def test_flops_follow_6n_full_4n_lora_8n_checkpointed():
    full = FlopShape(params=1000, trainable=1000, layers=2, hidden=8)
    lora = FlopShape(params=1000, trainable=0, layers=2, hidden=8)
    ckpt = FlopShape(params=1000, trainable=1000, layers=2, hidden=8, checkpointing=True)
    assert full.training_flops(10, 0) == 6 * 1000 * 10
    assert lora.training_flops(10, 0) == 4 * 1000 * 10
    assert ckpt.training_flops(10, 0) == 8 * 1000 * 10
    # Attention: 4*L*d*s per token forward, 3 passes' worth in training (12*L*d*s^2 per row).
    assert full.training_flops(0, 5**2) == 12 * 2 * 8 * 25


def test_flop_shape_counts_tied_head_once_and_skips_frozen(tiny_tokenizer):
    model = build_opt_model(tiny_tokenizer)
    total = sum(p.numel() for p in model.parameters())
    assert build_flop_shape(model, False).params == total  # tied: the head's multiply
    for p in model.model.decoder.layers.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in model.model.decoder.layers.parameters())
    assert build_flop_shape(model, False).trainable == total - frozen


def test_meter_counts_real_and_padded_tokens_across_steps():
    shape = FlopShape(params=100, trainable=100, layers=1, hidden=4)
    meter = ThroughputMeter(shape, peak_tflops=None, device=torch.device("cpu"), world_size=1)
    rows = [{"input_ids": [5] * n, "loss_spans": [[1, n]]} for n in (3, 10)]
    for _ in range(2):
        meter.add_batch(collate(rows, pad_token_id=1, loss_on="all", pad_to=32))
        meter.end_step()
    figures = meter.report()
    seconds = figures["step_s"] * 2
    assert math.isclose(figures["real_tokens_per_s"] * seconds, 26)
    assert math.isclose(figures["padded_tokens_per_s"] * seconds, 128)
    assert math.isclose(figures["samples_per_s"] * seconds, 4)
    assert math.isclose(figures["padding"], 1 - 26 / 128)
    assert figures["mfu"] is None and "MFU" not in format_throughput(figures)
    overall = meter.report(overall=True)  # the run so far: the same counts
    assert math.isclose(overall["padding"], figures["padding"])
    assert math.isclose(overall["samples_per_s"] / overall["real_tokens_per_s"], 4 / 26)


# Names exactly as torch.cuda.get_device_name() reports them, with dense 16-bit peaks.
KNOWN_GPUS = [
    ("NVIDIA B200", 2250.0),
    ("NVIDIA H100 80GB HBM3", 989.4),
    ("NVIDIA H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4),
    ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA GH200 144G HBM3e", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-SXM4-40GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L40S", 362.05),
    ("NVIDIA L40", 181.05),
    ("NVIDIA L4", 121.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA RTX 6000 Ada Generation", 364.2),
    ("Tesla V100-SXM2-16GB", 125.0),
    ("Tesla V100-SXM2-32GB", 125.0),
    ("Tesla V100-PCIE-32GB", 112.0),
    ("Tesla T4", 65.0),
]


@pytest.mark.parametrize(("name", "peak"), KNOWN_GPUS)
def test_known_gpus_get_their_own_datasheet_peak(name, peak):
    assert lookup_peak_tflops(name, "bf16", None) == peak
    assert lookup_peak_tflops(name, "fp16", None) == peak
    assert lookup_peak_tflops(name, "fp32", None) is None  # the table is 16-bit only


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA A10G",  # AWS's A10 variant: not the A10's tensor rate, and no datasheet
        "NVIDIA H100",  # not a reported name: a prefix of several parts, none implied
        "NVIDIA L40G",
        "NVIDIA A100X",
        "NVIDIA H100 NVL-ish",
        "NVIDIA GeForce RTX 4090",
        "cpu",
        "",
    ],
)
def test_names_are_never_matched_by_substring(name):
    assert lookup_peak_tflops(name, "bf16", None) is None


def test_normalised_names_differ_for_different_parts():
    assert normalize_device_name("NVIDIA L40") != normalize_device_name("NVIDIA L4")
    assert normalize_device_name("NVIDIA H100 NVL") != normalize_device_name("NVIDIA H100 PCIe")
    assert normalize_device_name("Tesla V100-SXM2-16GB") == "v100 sxm2"
    assert normalize_device_name(" nvidia a100_pcie-40gb ") == "a100 pcie"


def test_the_override_wins_for_any_name_and_precision():
    assert lookup_peak_tflops("NVIDIA H100 PCIe", "bf16", 500.0) == 500.0
    assert lookup_peak_tflops("NVIDIA A10G", "bf16", 70.0) == 70.0
    assert lookup_peak_tflops("cpu", "fp32", 2.1) == 2.1
