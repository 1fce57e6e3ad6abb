"""Putting a finished model folder in place so that a kill at any moment leaves either the
previous model or a folder clearly marked incomplete, which the next run completes.

The new folder is first written whole as OUTPUT/.saving-XXXX (flushed to disk, modes
shared). Then the journal OUTPUT/INCOMPLETE_SAVE.json names it, the entries it brings
and the previous model's entries it makes stale, and the publish runs: remove config.json
(from then on from_pretrained refuses the folder), delete the stale entries, move the new
ones in with config.json last, delete the staging folder and the journal. Each step can be
repeated, so an interrupted publish is completed by running the same steps again from the
journal (`recover_interrupted_save`, at the start of every training run). Before the
journal exists the previous model is untouched and the `.saving-*` folder is litter that
the same start-up deletes.

The output folder itself is kept: it also holds the run's logs, metrics and checkpoints,
which are never touched here.

Test hook (the only one): SFT_TEST_PAUSE_PUBLISH=1 makes the publish sleep 60 s after its
first move, inside the window, so a test can SIGKILL it there.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys
import time

from utils.errors import UserError
from utils.files import fsync_dir, replace, write_atomically

JOURNAL = "INCOMPLETE_SAVE.json"
STAGING_PREFIX = ".saving-"
COMMIT_MARKER = "config.json"
LORA_ADAPTER_DIR = "lora_adapter"
PAUSE_ENV = "SFT_TEST_PAUSE_PUBLISH"
# What a model folder owns: ours, a sharded save's, DeepSpeed-Chat's pytorch_model.bin and
# vocabulary files. A previous save's leftovers among these would be read beside the new
# files (from_pretrained prefers a stale model.safetensors to a new shard index).
MODEL_ENTRIES = (
    COMMIT_MARKER,
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model-*-of-*.bin",
    "pytorch_model.bin.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    LORA_ADAPTER_DIR,
)


def publish_folder(staging: str, output_dir: str) -> None:
    """Replace the model in `output_dir` by the complete folder `staging` (inside it)."""
    entries = sorted(os.listdir(staging))
    stale = [name for name in model_entries(output_dir) if name not in entries]
    journal = {"staging": os.path.basename(staging), "entries": entries, "stale": stale}
    write_atomically(os.path.join(output_dir, JOURNAL), json.dumps(journal, indent=1))
    _roll_forward(output_dir, journal)


def model_entries(output_dir: str) -> list[str]:
    """The entries of `output_dir` that belong to a saved model (not logs or checkpoints)."""
    return sorted(
        name
        for name in os.listdir(output_dir)
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in MODEL_ENTRIES)
    )


def recover_interrupted_save(output_dir: str | None) -> str | None:
    """Complete a publish a kill interrupted and delete unpublished `.saving-*` folders.

    Returns a sentence for the log when a publish was completed. Rank 0 only.
    """
    if not output_dir or not os.path.isdir(output_dir):
        return None
    note = None
    path = os.path.join(output_dir, JOURNAL)
    if os.path.exists(path):
        journal = _read_journal(path)
        _roll_forward(output_dir, journal)
        note = (
            f"completed the save a stopped run left unfinished in {output_dir} ({JOURNAL}); "
            "that model was not verified"
        )
    for name in os.listdir(output_dir):
        if name.startswith(STAGING_PREFIX):  # killed before publishing: nobody owns it
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return note


def interrupted_save_problem(folder: str) -> str | None:
    """For tools that only read a model folder: what to do when a publish is pending."""
    if not os.path.exists(os.path.join(folder, JOURNAL)):
        return None
    return (
        f"{folder} holds an interrupted save ({JOURNAL}): its files are a mix of two models. "
        f"Complete it with `python -m utils.model.publish {folder}` (or rerun the training "
        "command, which completes it first)."
    )


def _roll_forward(output_dir: str, journal: dict) -> None:
    staging = os.path.join(output_dir, journal["staging"])
    if os.path.lexists(os.path.join(staging, COMMIT_MARKER)):  # nothing has been moved yet
        _delete(os.path.join(output_dir, COMMIT_MARKER))  # the old model stops loading first
    for name in journal["stale"]:
        _delete(os.path.join(output_dir, name))
    moved = 0
    for name in sorted(journal["entries"], key=lambda n: n == COMMIT_MARKER):
        source, target = os.path.join(staging, name), os.path.join(output_dir, name)
        if not os.path.lexists(source):
            continue  # moved before the interruption
        if os.path.isdir(source):
            _delete(target)  # a folder (lora_adapter) cannot be renamed over a folder
        replace(source, target)
        moved += 1
        if moved == 1 and os.environ.get(PAUSE_ENV):
            print(f"{PAUSE_ENV}: pausing inside the publish window", file=sys.stderr, flush=True)
            time.sleep(60)
    shutil.rmtree(staging, ignore_errors=True)
    os.remove(os.path.join(output_dir, JOURNAL))
    fsync_dir(output_dir)


def _delete(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
    else:
        return
    fsync_dir(os.path.dirname(path))


def _read_journal(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            journal = json.load(f)
        staging = journal["staging"]
        if staging.startswith(STAGING_PREFIX) and os.sep not in staging:
            return journal
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    raise UserError(
        f"{path} is unreadable, so the interrupted save it records cannot be completed. "
        "Delete it and the .saving-* folder beside it; the model files there are incomplete."
    )


if __name__ == "__main__":  # python -m utils.model.publish OUTPUT: complete a pending save
    for folder in sys.argv[1:]:
        print(recover_interrupted_save(folder) or f"{folder}: no interrupted save")
