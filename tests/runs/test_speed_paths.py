"""Issue 14 wired into the tool: the loss path the loop runs, bf16 on CPUs through autocast,
the attention choice, --compile, and the memory plan's logits."""

from __future__ import annotations

from dataclasses import replace

import deepspeed
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config, OPTConfig

from tests.conftest import summary_setup
from tests.token_loss_worker import PAD, build_model, build_rows
from utils.checkpoint.checkpointer import build_checkpointer
from utils.checkpoint.config import CheckpointConfig
from utils.cli.memory_plan import plan_inputs
from utils.cli.parse import parse_args
from utils.cli.summary import build_summary
from utils.cli.validate import validate
from utils.data.common import SFTData, SourceStats
from utils.data.config import BatchConfig
from utils.data.loaders import build_eval_loader, build_train_loader
from utils.data.packing import pack_layout
from utils.demo.tiny import build_opt_model
from utils.distributed import DistInfo
from utils.engine.accumulation import StepPlan
from utils.engine.config import TrainConfig
from utils.engine.ds_config import EngineSetup, build_ds_config
from utils.engine.loop import TrainLoop, train
from utils.errors import ConfigError, UserError
from utils.model.attention import resolve_attention
from utils.model.chunk_size import default_chunk_tokens
from utils.model.config import LoraConfig
from utils.model.load import build_model as build_causal_lm
from utils.model.loss import choose_loss_path, count_trained, model_nll
from utils.observe.config import ObserveConfig
from utils.observe.progress import build_monitor, load_metrics
from utils.observe.throughput import build_meter
from utils.planner.estimate import GB, plan_memory
from utils.planner.loss_memory import estimate_loss_memory
from utils.planner.shape import measure_shape

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def loss_path(model, setting="auto", zero_stage=0, compiled=False):
    return choose_loss_path(
        model, setting, zero_stage=zero_stage, device_type="cpu", fp32=False, compiled=compiled
    )


def test_the_loss_path_follows_the_model_the_zero_stage_and_the_flags(tiny_tokenizer):
    model = build_opt_model(tiny_tokenizer)
    path = loss_path(model)
    vocab = model.lm_head.out_features
    assert (path.chunked, path.mode, path.kernel) == (True, "fused", "torch")
    assert path.chunk_tokens == default_chunk_tokens(vocab, None)  # a CPU's chunks
    assert path.describe().startswith("chunked (fused,")
    assert loss_path(model, zero_stage=3).mode == "recompute"  # no whole weight gradient held
    off = loss_path(model, "off")
    assert not off.chunked and off.describe() == "plain (full logits): --chunked_loss off"
    compiled = loss_path(model, compiled=True)
    assert not compiled.chunked and "--compile" in compiled.reason
    model.lm_head = torch.nn.Sequential(model.lm_head)  # logits no longer head(hidden) as-is
    fallback = loss_path(model)
    assert not fallback.chunked and "Sequential" in fallback.describe()
    with pytest.raises(UserError, match="--chunked_loss on cannot be used"):
        loss_path(model, "on")


def test_the_loop_trains_and_evaluates_with_the_chunked_loss_and_logs_the_plain_value(
    one_rank_group, tmp_path
):
    """One optimizer step of train() on a tiny OPT: the output layer never returns logits
    (training and evaluation run the chunked loss), and the logged step loss and the first
    evaluation equal the plain loss of the same batches within fp32 rounding."""
    dist = one_rank_group
    dataset = Dataset.from_list(build_rows())
    geometry = {"pad_token_id": PAD, "rank": 0, "world_size": 1, "on_gpu": False}
    train_loader = build_train_loader(
        dataset, BatchConfig(loss_on="all"), micro_batch=4, max_seq_len=64, seed=0,
        mask_dtype=torch.float32, **geometry,
    )  # fmt: skip
    eval_loader = build_eval_loader(dataset, BatchConfig(loss_on="all"), micro_batch=8, **geometry)
    reference = build_model().eval()  # the same weights as the trained model's start
    train_loader.sampler.set_epoch(0)
    with torch.no_grad():
        step = [model_nll(reference, b, fp32=True) for b in train_loader]
        evals = [model_nll(reference, b, fp32=True) for b in eval_loader]
    plain_step = float(sum(n for n, _ in step)) / sum(c for _, c in step)
    plain_eval = float(sum(n for n, _ in evals)) / sum(c for _, c in evals)

    model = build_model()
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
              "train_batch_size": 8, "zero_optimization": {"stage": 0},
              "zero_allow_untested_optimizer": True}  # fmt: skip
    checkpointer = build_checkpointer(CheckpointConfig(), str(tmp_path), {}, dist)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config
    )
    head_outputs = []
    model.lm_head.register_forward_hook(lambda m, i, out: head_outputs.append(out.shape))
    plan = StepPlan(micro_batches_per_epoch=len(train_loader.sampler), accumulation=2, epochs=1)
    loop = TrainLoop(
        engine=engine, train_loader=train_loader, eval_loader=eval_loader, dist=dist, plan=plan,
        monitor=build_monitor(str(tmp_path), ObserveConfig(), plan.total_steps, 0),
        meter=build_meter(engine, False, None, dist), checkpointer=checkpointer,
        loss=loss_path(model),
    )  # fmt: skip
    results = train(loop, TrainConfig(gradient_accumulation_steps=2)).evals
    assert plan.total_steps == 1 and engine.global_steps == 1
    assert head_outputs and all(shape == () for shape in head_outputs)  # a loss, never logits
    (logged,) = [r for r in load_metrics(str(tmp_path / "metrics.jsonl")) if r["type"] == "train"]
    assert logged["loss"] == pytest.approx(plain_step, rel=1e-6)
    assert results[0].loss == pytest.approx(plain_eval, rel=1e-6)
    assert results[0].tokens == sum(count_trained(b["labels"]) for b in eval_loader)


def test_cpu_bf16_at_zero0_trains_through_autocast_and_the_summary_says_why(tiny_model_dir):
    cfg = parse_args(["--model_name_or_path", str(tiny_model_dir), "--dtype", "bf16"])

    def ds_config(zero_stage: int, on_cuda: bool) -> dict:
        engine = replace(cfg.engine, zero_stage=zero_stage)
        return build_ds_config(engine, cfg.train, cfg.observe, 1, "bf16", on_cuda=on_cuda)

    config = ds_config(0, on_cuda=False)
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert not config["bf16"]["enabled"]  # no FP16_UnfusedOptimizer master copies
    engine = EngineSetup(config=config, dtype_reason="bf16, as --dtype asked")
    assert engine.dtype == "bf16" and engine.autocast
    # ZeRO 1-3: DeepSpeed's bf16 optimizer partitions its master copy; GPUs: its bf16 mode.
    for zero_stage, on_cuda in ((2, False), (0, True)):
        config = ds_config(zero_stage, on_cuda)
        assert config["bf16"]["enabled"] and "torch_autocast" not in config

    rows = {"input_ids": [[1, 5, 6, 7]], "prompt_len": [1]}
    data = SFTData(Dataset.from_dict(rows), Dataset.from_dict(rows), [SourceStats("d", 1)])
    plan = StepPlan(micro_batches_per_epoch=1, accumulation=1, epochs=1)
    path = loss_path(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    setup = summary_setup(engine.config, dtype_reason=engine.dtype_reason, loss=path)
    text = build_summary(cfg, data, (10, 10), setup, plan)
    assert "ZeRO stage 0, bf16 (bf16, as --dtype asked; via torch.autocast" in text
    assert "loss         chunked (fused," in text
    assert "attention    default" in text


def test_attention_auto_is_sdpa_on_a_cpu_and_flash_only_for_gpu_packing(tiny_model_dir):
    auto = {"model_type": "opt", "dtype": "bf16", "attention_dropout": 0.0, "flash_error": None}
    assert resolve_attention("auto", packing=True, on_cuda=True, **auto)[0] == "flash_attention_2"
    assert resolve_attention("auto", packing=False, on_cuda=True, **auto)[0] is None
    assert resolve_attention("auto", packing=True, on_cuda=False, **auto)[0] is None
    no_flash = {**auto, "flash_error": "ModuleNotFoundError: No module named 'flash_attn'"}
    assert resolve_attention("auto", packing=True, on_cuda=True, **no_flash)[0] == "flex_attention"
    fp32 = {**auto, "dtype": "fp32"}
    assert resolve_attention("auto", packing=True, on_cuda=True, **fp32)[0] == "flex_attention"
    assert resolve_attention("eager", packing=True, on_cuda=True, **auto)[0] == "eager"
    assert pack_layout("flash_attention_2") == "flat" and pack_layout("sdpa") == "mask"

    cfg = parse_args(["--model_name_or_path", str(tiny_model_dir), "--packing", "--dry_run"])
    setup = validate(cfg, CPU)  # on this CPU
    assert setup.attention is None and "default" in setup.attention_reason
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = build_causal_lm(cfg.model, setup.model_config, tokenizer, attention=setup.attention)
    assert model.config._attn_implementation == "sdpa"


def test_validation_refuses_flash_attention_here_and_chunked_loss_with_compile(
    tiny_model_dir, tmp_path
):
    base = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "o")]
    flash = parse_args([*base, "--attn_implementation", "flash_attention_2"])
    with pytest.raises(ConfigError, match="flash_attention_2 needs a CUDA GPU and the flash-attn"):
        validate(flash, CPU)
    both = parse_args([*base, "--chunked_loss", "on", "--compile"])
    with pytest.raises(ConfigError, match="--chunked_loss on and --compile exclude each other"):
        validate(both, CPU)
    assert validate(parse_args([*base, "--compile"]), CPU).engine.config  # auto + compile: plain


def planned(config, tmp_path, *flags: str):
    """--estimate_memory's plan inputs for a config-only model folder and `flags`."""
    config.save_pretrained(tmp_path)
    cfg = parse_args(["--model_name_or_path", str(tmp_path), "--estimate_memory", *flags])
    return plan_inputs(cfg, validate(cfg, CPU))


def test_memory_plan_counts_one_chunk_of_logits_with_the_chunked_loss(tmp_path):
    opt = OPTConfig(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                    ffn_dim=8192, word_embed_proj_dim=2048, vocab_size=50272)  # fmt: skip
    shape = measure_shape(opt, LoraConfig())
    tokens = 16 * 512
    plain = estimate_loss_memory(shape, tokens, "bf16", "plain", 80 * GB)
    assert plain == tokens * 50272 * 10  # 4.1 GB: logits, fp32 upcast, log-softmax
    chunk = default_chunk_tokens(50272, 80 * GB)  # the chunks a run on an 80 GB GPU takes
    recompute = estimate_loss_memory(shape, tokens, "bf16", "recompute", 80 * GB)
    assert recompute == chunk * 50272 * 10
    fused = estimate_loss_memory(shape, tokens, "bf16", "fused", 80 * GB)
    assert fused == recompute + 50272 * 2048 * 2  # the head's gradient, held to the backward
    assert fused < plain / 3
    args = ["--zero_stage", "2", "--per_device_train_batch_size", "16"]
    on, off = planned(opt, tmp_path, *args), planned(opt, tmp_path, *args, "--chunked_loss", "off")
    assert plan_memory(shape, off).activations - plan_memory(shape, on).activations == plain - fused
    gemma2 = planned(Gemma2Config(num_hidden_layers=2), tmp_path / "gemma2")
    assert gemma2.loss_mode == "plain"  # it soft-caps its logits: the chunked loss would differ
