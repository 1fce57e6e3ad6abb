"""build_sft_data: the data chain end to end, behind the tokenised-data cache."""

from __future__ import annotations

import os

import pyarrow.compute as pc
from datasets import Dataset, concatenate_datasets
from transformers import PreTrainedTokenizerBase

from utils.data.cache import (
    ENTRY_PREFIX,
    build_space,
    cache_key,
    entry_lock,
    load_cached,
    predates_process,
    save_cached,
    sweep_dead_builds,
)
from utils.data.chat import ChatTemplate
from utils.data.chat_rows import conversation_reader, drop_skipped, tokenize_chat_rows
from utils.data.common import FORMAT_VERSION, DataError, SFTData, SourceStats
from utils.data.config import DEFAULT_EOT, DSCHAT, DataConfig
from utils.data.formats import format_rows
from utils.data.local import part_files
from utils.data.skipped import check_not_all_skipped, required_columns
from utils.data.sources import Source, fingerprint_source, load_source, resolve_sources
from utils.data.split import parse_data_split, partition, resample, shuffled
from utils.data.tokenize import TRUNCATED, fingerprint_tokenizer, tokenize_rows
from utils.files import tree_bytes

TRAIN_ONLY_SPLIT = [9.0, 1.0]  # eval rows for sources without an eval split (DeepSpeed-Chat)
MISSING_FIELD = "missing prompt or response"  # why the DeepSpeed-Chat path skips a row


def build_sft_data(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate | None
) -> SFTData:
    """Phase-1 (SFT) train and eval rows, tokenised; built once and then read from the cache.

    Safe to call from several processes at once: one builds, the others wait and read.
    With cfg.rebuild_data_cache an entry older than this process is built again.
    `template`: --chat_template as loaded (`load_chat_template`), every row rendered
    through it; None for DeepSpeed-Chat's format (--chat_template dschat).
    """
    if problems := check_data_config(cfg):
        raise DataError("\n".join(problems))
    split = parse_data_split(cfg.data_split)
    sources = resolve_sources(cfg.data_path, cfg.sft_only_data_path)
    key = cache_key(
        {
            "format": FORMAT_VERSION,
            "sources": [[s.name, fingerprint_source(s), s.weight, s.sft_only] for s in sources],
            "split": split,
            "seed": cfg.seed,
            "max_seq_len": cfg.max_seq_len,
            "eot_token": cfg.eot_token,
            "tokenizer": fingerprint_tokenizer(tokenizer),
            # The template's text, not its name: editing the file rebuilds the data.
            "chat_template": template.text if template else None,
            "system_prompt": cfg.system_prompt,
        }
    )
    root = cfg.data_output_path
    folder = os.path.join(root, ENTRY_PREFIX + key)
    if cached := load_reusable(folder, cfg.rebuild_data_cache):
        sweep_dead_builds(root)  # e.g. of a build killed after its entry was published
        return cached
    os.makedirs(root, exist_ok=True)
    with entry_lock(folder):
        # Another process may have finished the same entry while this one waited.
        if cached := load_reusable(folder, cfg.rebuild_data_cache):
            return cached
        sweep_dead_builds(root, held=folder)
        input_bytes = sum(tree_bytes(s.path) for s in sources if s.path)
        with build_space(folder, input_bytes) as work:
            save_cached(
                build_uncached(sources, split, cfg, tokenizer, template, work), folder, work
            )
    return load_cached(folder)


def load_reusable(folder: str, rebuild: bool) -> SFTData | None:
    return None if rebuild and predates_process(folder) else load_cached(folder)


def check_data_config(cfg: DataConfig) -> list[str]:
    """Every problem with the data flags, without loading any data (for up-front validation)."""
    problems = []
    for check in (
        lambda: parse_data_split(cfg.data_split),
        lambda: resolve_sources(cfg.data_path, cfg.sft_only_data_path),
    ):
        try:
            check()
        except DataError as err:
            problems.append(str(err))
    if cfg.max_seq_len < 1:
        problems.append(f"--max_seq_len {cfg.max_seq_len}: must be at least 1, e.g. 512")
    if not 0 <= cfg.seed < 2**32:  # numpy's RandomState (split, blend) takes no other seed
        problems.append(f"--seed {cfg.seed}: must be between 0 and {2**32 - 1}, e.g. 1234")
    if cfg.data_num_proc < 0:
        problems.append(f"--data_num_proc {cfg.data_num_proc}: must be 0 (automatic) or more")
    return problems + chat_flag_problems(cfg)


def chat_flag_problems(cfg: DataConfig) -> list[str]:
    """Flags that belong to one format only: refused with the other rather than ignored."""
    if cfg.chat_template == DSCHAT:
        if cfg.system_prompt is not None:
            return [
                "--system_prompt needs a chat template (DeepSpeed-Chat's format has no system "
                "turn): add --chat_template model or --chat_template FILE.jinja, or drop it."
            ]
        return []
    # A template ends each assistant turn with its own token (e.g. <|im_end|>); another
    # token appended after it would be trained but never seen by a server applying the
    # template, and --add_eot_token would add an embedding nothing uses.
    problems = []
    if cfg.add_eot_token:
        problems.append(
            f"--add_eot_token is DeepSpeed-Chat's end-of-conversation token; with --chat_template "
            f"{cfg.chat_template} the template ends every turn itself. Drop --add_eot_token."
        )
    if cfg.eot_token != DEFAULT_EOT:
        problems.append(
            f"--eot_token {cfg.eot_token!r} applies to --chat_template dschat only; with "
            f"--chat_template {cfg.chat_template} the template ends every turn. Drop --eot_token."
        )
    return problems


def build_uncached(
    sources: list[Source],
    split: list[float],
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate | None,
    work: str,
) -> SFTData:
    """Every source through load -> phase-1 split -> format -> tokenise, then the blend."""
    built = [
        build_source(s, split, cfg, tokenizer, template, f"{work}/{i}")
        for i, s in enumerate(sources)
    ]
    trains, evals, stats = zip(*built, strict=True)
    if not any(len(rows) for rows in evals):
        raise DataError(
            f"no eval rows: the first --data_split share ({cfg.data_split}) of the eval rows of "
            f"{[s.name for s in sources]} is empty; raise the first weight or add eval rows"
        )
    train = concatenate_datasets(list(trains))
    train = train.select(shuffled(len(train), cfg.seed)).remove_columns(TRUNCATED)
    eval_rows = concatenate_datasets(list(evals)).remove_columns(TRUNCATED)
    return SFTData(train=train, eval=eval_rows, sources=list(stats))


def build_source(
    source: Source,
    split: list[float],
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate | None,
    work: str,
) -> tuple[Dataset, Dataset, SourceStats]:
    """One source's tokenised train rows (resampled by its weight), eval rows and statistics.

    skipped_rows and truncated_rows count the source's phase-1 rows (train and eval);
    train_rows and train_tokens count what trains after resampling.
    """
    raw, formatter = load_source(source, f"{work}-hf")
    entry_columns = source.entry.columns if source.entry else None
    columns = required_columns(raw["train"].column_names, entry_columns)
    stat = SourceStats(source.name)
    tokenised = {}
    for part, rows in select_phase1(source, raw, split, cfg.seed).items():
        if template is None:
            formatted, skipped = format_rows(rows, formatter, f"{work}-{part}-format.arrow")
            check_not_all_skipped(rows, len(formatted), columns, describe_part(source, part, split))
            stat.add_skips(MISSING_FIELD, skipped)
            tokenised[part] = tokenize_rows(
                formatted,
                tokenizer,
                cfg.max_seq_len,
                cfg.eot_token,
                f"{work}-{part}-tokens.arrow",
                cfg.data_num_proc,
            )
        else:
            read = conversation_reader(source.entry and source.entry.format, cfg.system_prompt)
            rendered = tokenize_chat_rows(
                rows,
                read,
                tokenizer,
                template,
                cfg.max_seq_len,
                f"{work}-{part}-chat.arrow",
                cfg.data_num_proc,
            )
            tokenised[part] = drop_skipped(rendered, stat)
        stat.truncated_rows += pc.sum(tokenised[part].data.column(TRUNCATED)).as_py() or 0
    if len(tokenised["train"]) == 0:  # every row skipped: say why before any training
        raise DataError(
            f"{source.name}: every training row was skipped: "
            + "; ".join(stat.describe_skips())
            + ". Fix the rows, or check --chat_template matches the data."
        )
    picked = resample(len(tokenised["train"]), source.weight, cfg.seed)
    lengths = pc.list_value_length(tokenised["train"].data.column("input_ids")).to_numpy()
    stat.train_rows, stat.eval_rows = len(picked), len(tokenised["eval"])
    stat.train_tokens = int(lengths[picked].sum())
    return tokenised["train"].select(picked), tokenised["eval"], stat


def describe_part(source: Source, part: str, split: list[float]) -> str:
    """Where a source's train or eval rows come from, for messages: the file when known."""
    files = part_files(source.path, part) if source.path else []
    where = ", ".join(files) if files else f"{source.name} ({part} split)"
    if not source.sft_only and split[0] < sum(split):
        where += " (the SFT share by --data_split)"
    return where


def select_phase1(
    source: Source, raw: dict[str, Dataset], split: list[float], seed: int
) -> dict[str, Dataset]:
    """The source's SFT share of its train and eval rows (all of them for sft-only sources)."""
    if "eval" not in raw:
        rows = raw["train"]
        raw = {
            "train": rows.select(partition(len(rows), TRAIN_ONLY_SPLIT, seed, 0)),
            "eval": rows.select(partition(len(rows), TRAIN_ONLY_SPLIT, seed, 1)),
        }
    if not source.sft_only:
        raw = {k: v.select(partition(len(v), split, seed, 0)) for k, v in raw.items()}
    if len(raw["train"]) == 0:
        raise DataError(
            f"{source.name}: no training rows for SFT (the first --data_split share of its "
            "train rows is empty); raise the first --data_split weight or add rows"
        )
    return raw
