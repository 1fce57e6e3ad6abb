"""build_sft_data: the data chain end to end, behind the tokenised-data cache."""

from __future__ import annotations

import os
import shutil

import pyarrow.compute as pc
from datasets import Dataset, concatenate_datasets
from transformers import PreTrainedTokenizerBase

from utils.data.cache import (
    ENTRY_PREFIX,
    cache_key,
    entry_lock,
    load_cached,
    predates_process,
    save_cached,
    sweep_dead_builds,
    work_folder,
)
from utils.data.common import FORMAT_VERSION, DataError, SFTData, SourceStats
from utils.data.config import DataConfig
from utils.data.formats import format_rows
from utils.data.local import part_files
from utils.data.skipped import check_not_all_skipped, required_columns
from utils.data.sources import Source, fingerprint_source, load_source, resolve_sources
from utils.data.split import parse_data_split, partition, resample, shuffled
from utils.data.tokenize import TRUNCATED, fingerprint_tokenizer, tokenize_rows

TRAIN_ONLY_SPLIT = [9.0, 1.0]  # eval rows for sources without an eval split (DeepSpeed-Chat)


def build_sft_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> SFTData:
    """Phase-1 (SFT) train and eval rows, tokenised; built once and then read from the cache.

    Safe to call from several processes at once: one builds, the others wait and read.
    With cfg.rebuild_data_cache an entry older than this process is built again.
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
        }
    )
    root = cfg.data_output_path
    folder = os.path.join(root, ENTRY_PREFIX + key)
    if cached := load_reusable(folder, cfg.rebuild_data_cache):
        return cached
    os.makedirs(root, exist_ok=True)
    with entry_lock(folder):
        # Another process may have finished the same entry while this one waited.
        if cached := load_reusable(folder, cfg.rebuild_data_cache):
            return cached
        sweep_dead_builds(folder)
        work = work_folder(folder)
        os.makedirs(work)
        try:
            save_cached(build_uncached(sources, split, cfg, tokenizer, work), folder, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
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
    return problems


def build_uncached(
    sources: list[Source],
    split: list[float],
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    work: str,
) -> SFTData:
    """Every source through load -> phase-1 split -> format -> tokenise, then the blend."""
    built = [build_source(s, split, cfg, tokenizer, f"{work}/{i}") for i, s in enumerate(sources)]
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
        formatted, skipped = format_rows(rows, formatter, f"{work}-{part}-format.arrow")
        check_not_all_skipped(rows, len(formatted), columns, describe_part(source, part, split))
        tokenised[part] = tokenize_rows(
            formatted,
            tokenizer,
            cfg.max_seq_len,
            cfg.eot_token,
            f"{work}-{part}-tokens.arrow",
            cfg.data_num_proc,
        )
        stat.skipped_rows += skipped
        stat.truncated_rows += pc.sum(tokenised[part].data.column(TRUNCATED)).as_py() or 0
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
