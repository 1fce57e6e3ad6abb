"""The block printed once before training: what is about to run, in numbers.

Model and parameters, data per source, tokens and the share that carries loss, batch
geometry, steps, DeepSpeed essentials and the output folder; plus the warnings that
matter (a data split that leaves SFT a minority of rows, truncated and skipped rows).
"""

from __future__ import annotations

import os

import pyarrow.compute as pc

from utils.config import Config
from utils.data.common import SFTData
from utils.data.config import DSCHAT
from utils.data.split import parse_data_split
from utils.distributed import print_rank_0, warn_rank_0
from utils.engine.accumulation import StepPlan
from utils.engine.ds_config import CPU_BF16_AUTOCAST
from utils.run_setup import RunSetup

RULE = "=" * 72


def print_run_summary(
    cfg: Config, data: SFTData, params: tuple[int, int], setup: RunSetup, plan: StepPlan
) -> None:
    """Print the summary block and the data warnings (rank 0 only)."""
    print_rank_0(build_summary(cfg, data, params, setup, plan))
    for warning in data_warnings(cfg, data):
        warn_rank_0(warning)


def build_summary(
    cfg: Config, data: SFTData, params: tuple[int, int], setup: RunSetup, plan: StepPlan
) -> str:
    """The block's text. Every figure comes from what the run uses: the merged DeepSpeed
    config, attention and loss paths as start-up resolved them (`setup`), the loader's step
    plan (packs, not rows, under --packing) and the labels' rule (--loss_on)."""
    t, ds_config = cfg.train, setup.engine.config
    total, trainable = params
    lora = f", LoRA rank {cfg.lora.lora_dim} on '{cfg.lora.lora_module_name}'"
    capped = (
        f", stopping at {plan.total_steps:,} (--max_steps)"
        if plan.total_steps < plan.uncapped_steps
        else ""
    )
    tokens, loss_share = count_tokens(data, cfg.batch.loss_on)
    avg = tokens / max(len(data.train), 1)
    covered = {  # what --loss_on covers in this format
        ("all", True): "prompts and responses",
        ("all", False): "every token of the conversations",
        ("response", True): "responses only",
        ("response", False): "assistant turns only",
    }[cfg.batch.loss_on, cfg.data.chat_template == DSCHAT]
    lines = [
        RULE,
        "run summary",
        RULE,
        f"model        {cfg.model.model_name_or_path}",
        f"parameters   {_human(total)} total, {_human(trainable)} trainable "
        f"({100 * trainable / max(total, 1):.1f}%){lora if cfg.lora.enabled else ''}",
        "data         " + _source_table(data)[0],
        *("             " + row for row in _source_table(data)[1:]),
        f"split        --data_split {cfg.data.data_split}: {_split_note(cfg)}",
        f"format       {describe_format(cfg)}",
        f"tokens       {tokens:,} training tokens ({avg:.0f} per row); "
        f"loss on {100 * loss_share:.0f}% of them ({covered}); "
        f"rows cut at --max_seq_len {cfg.data.max_seq_len}: {_truncated(data):,}",
        f"batch        {ds_config['train_micro_batch_size_per_gpu']} "
        f"{'packed rows' if cfg.batch.packing else 'sequences'} per device x "
        f"{_count(setup.world_size, 'rank')} x {ds_config['gradient_accumulation_steps']} accumulation "
        f"= {ds_config['train_batch_size']} per optimizer step",
        f"loader       {setup.loader.describe()}",
        f"steps        {_count(plan.micro_batches_per_epoch, 'micro-batch', 'es')} = "
        f"{_count(plan.steps_per_epoch, 'step')} per epoch x "
        f"{_count(t.num_train_epochs, 'epoch')} = "
        f"{_count(plan.uncapped_steps, 'optimizer step')}{capped}",
        f"deepspeed    {_ds_essentials(setup, cfg)}",
        f"loss         {setup.loss.describe()}",
        f"attention    {setup.attention or 'default'} ({setup.attention_reason or 'transformers'})"
        f"{'; torch.compile on' if cfg.model.compile else ''}",
        f"output       {os.path.abspath(t.output_dir) if t.output_dir else '(none: dry run)'}",
        *_recipe_lines(cfg),
        RULE,
    ]
    return "\n".join(lines)


def data_warnings(cfg: Config, data: SFTData) -> list[str]:
    """Warnings a user should act on, each once."""
    warnings = []
    if (share := sft_share(cfg.data.data_split)) < 0.5 and cfg.data.data_path:
        warnings.append(
            f"--data_split {cfg.data.data_split} gives SFT only {100 * share:.0f}% of the "
            "rows of --data_path (the rest is kept for reward-model and RLHF training); "
            "to fine-tune on every row use --data_split 10,0,0."
        )
    for s in data.sources:
        if s.truncated_rows:
            warnings.append(
                f"{s.name}: {s.truncated_rows:,} rows are longer than --max_seq_len "
                f"{cfg.data.max_seq_len} and were truncated (their endings are not learned); "
                "raise --max_seq_len if the model allows."
            )
        if s.skipped_rows:
            warnings.append(
                f"{s.name}: {s.skipped_rows:,} rows were skipped: " + "; ".join(s.describe_skips())
            )
    return warnings


def describe_format(cfg: Config) -> str:
    """How rows are written: DeepSpeed-Chat's framing or the chat template (and system prompt)."""
    d = cfg.data
    if d.chat_template == DSCHAT:
        eot = f"{d.eot_token!r} appended{' (added as a special token)' if d.add_eot_token else ''}"
        return f"--chat_template dschat: ' Human: … Assistant: …', last answer trained, {eot}"
    own = " (the tokenizer's own template)" if d.chat_template == "model" else ""
    system = f"; --system_prompt {d.system_prompt!r}" if d.system_prompt else ""
    return f"--chat_template {d.chat_template}{own}: every assistant turn trained{system}"


def count_tokens(data: SFTData, loss_on: str) -> tuple[int, float]:
    """Training tokens, and the share of them the loss is computed on (the labels' rule)."""
    if len(data.train) == 0:
        return 0, 0.0
    table = data.train.data
    tokens = int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py())
    if loss_on == "all":
        return tokens, 1.0
    return tokens, trained_tokens(data) / max(tokens, 1)


def trained_tokens(data: SFTData) -> int:
    """Tokens inside the rows' loss spans: what --loss_on response trains."""
    if len(data.train) == 0:
        return 0
    bounds = pc.list_flatten(pc.list_flatten(data.train.data.column("loss_spans"))).to_numpy()
    return int(bounds[1::2].sum() - bounds[0::2].sum())  # [start, end, start, end, ...]


def sft_share(data_split: str) -> float:
    """The share of each --data_path source's rows that SFT uses (phase 1 of the split)."""
    weights = parse_data_split(data_split)
    return weights[0] / sum(weights)


def _split_note(cfg: Config) -> str:
    share = sft_share(cfg.data.data_split)
    note = f"SFT uses {100 * share:.0f}% of each --data_path source's rows"
    if cfg.data.sft_only_data_path:
        note += " (all rows of --sft_only_data_path)"
    return note


def _source_table(data: SFTData) -> list[str]:
    width = max([len(s.name) for s in data.sources] + [6])
    header = f"{'source':<{width}}  {'train':>9} {'eval':>8} {'skipped':>8} {'truncated':>9} {'train tokens':>13}"
    rows = [
        f"{s.name:<{width}}  {s.train_rows:>9,} {s.eval_rows:>8,} {s.skipped_rows:>8,} "
        f"{s.truncated_rows:>9,} {s.train_tokens:>13,}"
        for s in data.sources
    ]
    total = f"{'total':<{width}}  {len(data.train):>9,} {len(data.eval):>8,}"
    return [header, *rows, total] if len(data.sources) > 1 else [header, *rows]


def _recipe_lines(cfg: Config) -> list[str]:
    """Which values came from the --config recipe (the command line overrides it)."""
    if cfg.recipe.config is None:
        return []
    first, *rest = cfg.recipe.config.describe()
    return ["recipe       " + first, *("             " + line for line in rest)]


def _truncated(data: SFTData) -> int:
    return sum(s.truncated_rows for s in data.sources)


def _ds_essentials(setup: RunSetup, cfg: Config) -> str:
    engine = setup.engine
    ds = engine.config
    zero = ds.get("zero_optimization", {})
    offload = [
        k.removeprefix("offload_") for k in ("offload_optimizer", "offload_param") if k in zero
    ]
    precision = f"{engine.dtype} ({engine.dtype_reason})"
    if engine.autocast:
        precision = f"{engine.dtype} ({engine.dtype_reason}; {CPU_BF16_AUTOCAST})"
    return (
        f"ZeRO stage {engine.zero_stage}, {precision}, "
        f"offload {'+'.join(offload) if offload else 'off'}, "
        f"gradient clipping {ds.get('gradient_clipping', 'off')}, "
        f"gradient checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}"
        f"{', TensorBoard ' + cfg.observe.tensorboard_path if cfg.observe.enable_tensorboard else ''}"
    )


def _count(n: int, noun: str, plural: str = "s") -> str:
    return f"{n:,} {noun}{'' if n == 1 else plural}"


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
