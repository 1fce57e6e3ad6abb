"""What the GPU check trains: a model folder and a data folder.

Full check: an OPT-shaped model (random weights, the genuine OPT tokenizer) built by
build_opt_model.py (../shared/gpu/, copied into .gpu/ for a device call, as
../shared/gpu/README.md says) unless --model names a folder; and HH-RLHF harmless-base
dialogues cut into Dahoas/rm-static's prompt and answer (the prompt ends at the last
"Assistant:"), --rows distinct ones to train on and --eval_rows others to evaluate on.
--tiny: the embedded demo's tiny OPT and its instruction data (utils/demo/embedded.py).
"""

from __future__ import annotations

import json
import os
import random
import sys

from utils.files import write_atomically

# Where a device call finds what ../shared holds (only the checkout travels), then ../shared.
GPU_FOLDER = ".gpu"
SHARED = os.path.join(os.pardir, "shared")
ASSISTANT = "\n\nAssistant:"


def find(*candidates: str) -> str | None:
    return next((path for path in candidates if os.path.exists(path)), None)


def builder_command(model_dir: str, size: str) -> tuple[list[str], dict[str, str]] | None:
    """The command that builds an OPT model folder of `size` ("1.3b" or "tiny", the
    builder's names) with the genuine tokenizer, and its environment; None: no builder."""
    builder = find(
        os.path.join(GPU_FOLDER, "build_opt_model.py"),
        os.path.join(SHARED, "gpu", "build_opt_model.py"),
    )
    tokenizer = find(
        os.path.join(GPU_FOLDER, "opt-tokenizer"), os.path.join(SHARED, "data", "opt-tokenizer")
    )
    if builder is None or tokenizer is None:
        return None
    env = {**os.environ, "OPT_TOKENIZER": tokenizer}
    return [sys.executable, builder, model_dir, size], env


def demo_command(folder: str) -> list[str]:
    """The embedded demo's tiny OPT (`folder`/tiny-opt) and data (`folder`/data)."""
    return [sys.executable, "-m", "utils.demo.embedded", "--out", folder]


def default_dialogues() -> str | None:
    name = os.path.join("hh-rlhf-harmless-base", "test.jsonl")
    return find(os.path.join(GPU_FOLDER, name), os.path.join(SHARED, "data", name))


def write_hh_data(dialogues: str, folder: str, rows: int, eval_rows: int, seed: int) -> dict:
    """`rows` train and `eval_rows` eval rows (prompt, chosen), all distinct dialogues, as
    `folder`/train.jsonl and eval.jsonl; what was written."""
    pool = []
    with open(dialogues, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["chosen"]
            cut = text.rfind(ASSISTANT) + len(ASSISTANT)
            if cut >= len(ASSISTANT):
                pool.append({"prompt": text[:cut], "chosen": text[cut:]})
    random.Random(seed).shuffle(pool)
    if rows + eval_rows > len(pool):
        raise ValueError(
            f"{dialogues} has {len(pool)} dialogues, fewer than --rows {rows} + --eval_rows "
            f"{eval_rows}; ask for fewer"
        )
    os.makedirs(folder, exist_ok=True)
    for name, part in (("train", pool[:rows]), ("eval", pool[rows : rows + eval_rows])):
        text = "".join(json.dumps(r) + "\n" for r in part)
        write_atomically(os.path.join(folder, f"{name}.jsonl"), text)
    return {"dialogues": dialogues, "train_rows": rows, "eval_rows": eval_rows}
