"""The command line: DeepSpeed-Chat step 1's flags, names and defaults, plus ours, each declared once."""

from __future__ import annotations

import re
from dataclasses import fields

from utils.cli.parse import build_parser, parse_args
from utils.config import Config

# DeepSpeed-Chat step 1 (training/step1_supervised_finetuning/main.py), with the four flags
# deepspeed.add_config_arguments adds; launch scripts written for it must keep working.
DSCHAT_FLAGS = {
    "--data_path": ["Dahoas/rm-static"],
    "--data_split": "2,4,4",
    "--sft_only_data_path": [],
    "--data_output_path": None,  # ours: a per-user cache instead of the shared /tmp/data_files/
    "--model_name_or_path": None,
    "--per_device_train_batch_size": 16,
    "--per_device_eval_batch_size": 16,
    "--max_seq_len": 512,
    "--learning_rate": 1e-3,
    "--weight_decay": 0.0,
    "--num_train_epochs": 1,
    "--gradient_accumulation_steps": 1,
    "--lr_scheduler_type": "cosine",
    "--num_warmup_steps": 0,
    "--output_dir": None,
    "--seed": 1234,
    "--local_rank": -1,
    "--gradient_checkpointing": False,
    "--dropout": None,
    "--offload": False,
    "--dtype": None,  # ours: auto (fp16 on a CPU cannot train)
    "--zero_stage": 0,
    "--lora_dim": 0,
    "--lora_module_name": "decoder.layers.",
    "--only_optimize_lora": False,
    "--lora_learning_rate": 5e-4,
    "--compute_fp32_loss": False,
    "--enable_tensorboard": False,
    "--tensorboard_path": "step1_tensorboard",
    "--add_eot_token": False,
    "--eot_token": "<|endoftext|>",
    "--print_loss": False,
    "--deepspeed": False,
    "--deepspeed_config": None,
    "--deepscale": False,
    "--deepscale_config": None,
}
OURS = {
    "--rebuild_data_cache",
    "--data_num_proc",
    "--pad_to_max_len",
    "--packing",
    "--loss_on",
    "--chat_template",
    "--system_prompt",
    "--loss_averaging",
    "--trust_remote_code",
    "--tokenizer_name_or_path",
    "--save_lora_adapter",
    "--max_steps",
    "--dry_run",
    "--save_steps",
    "--save_total_limit",
    "--resume_from_checkpoint",
    "--trust_checkpoint",
    "--disk_full_wait_minutes",
    "--peak_tflops",
    "--estimate_memory",
    "--gpu_memory_gb",
    "--num_gpus_per_node",
    "--num_nodes",
    "--chunked_loss",
    "--attn_implementation",
    "--compile",
    "--dist_timeout_minutes",
    "--config",
    "--dataloader_num_workers",
}


def test_help_lists_deepspeed_chats_flags_and_ours_and_nothing_else():
    shown = set(re.findall(r"(?<![\w-])--\w+", build_parser().format_usage()))
    assert shown == set(DSCHAT_FLAGS) | OURS


def test_deepspeed_chats_defaults_are_kept():
    parser = build_parser()
    for flag, default in DSCHAT_FLAGS.items():
        if default is not None:
            assert parser.get_default(flag.removeprefix("--")) == default, flag


def test_every_setting_is_a_flag_and_parses_into_its_group():
    cfg = parse_args(["--model_name_or_path", "m", "--max_seq_len", "64", "--lora_dim", "4"])
    assert (cfg.data.max_seq_len, cfg.lora.lora_dim, cfg.model.model_name_or_path) == (64, 4, "m")
    flags = set(re.findall(r"(?<![\w-])--(\w+)", build_parser().format_help()))
    for group in fields(Config):
        for setting in fields(getattr(cfg, group.name)):
            assert setting.name in flags, f"{group.name}.{setting.name} has no flag"
