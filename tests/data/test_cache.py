"""The tokenised-data cache: hits, invalidation, forced rebuilds, crashes and concurrent builders."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from transformers import AutoTokenizer

import utils.data.build as build_module
import utils.data.cache as cache_module
from tests.conftest import REPO
from utils.data.build import build_sft_data
from utils.data.config import DataConfig
from utils.demo.tiny import build_tokenizer


def write_source(folder, answers):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"prompt": f" Human: Q{i}? Assistant:", "chosen": f" {a}"} for i, a in enumerate(answers)
    ]
    for name in ("train", "eval"):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


@pytest.fixture
def builds(monkeypatch):
    """Counts real (uncached) builds."""
    calls = []
    real = build_module.build_uncached

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(build_module, "build_uncached", counted)
    return calls


def config(tmp_path, src, **kw):
    return DataConfig(
        data_path=[src], data_split="10,0,0", data_output_path=str(tmp_path / "cache"), **kw
    )


def rows(data):
    return [r["input_ids"] for r in data.train]


def test_a_second_build_reads_the_cache(tmp_path, tiny_tokenizer, builds):
    cfg = config(tmp_path, write_source(tmp_path / "src", ["yes", "no", "maybe"]))
    first = build_sft_data(cfg, tiny_tokenizer, None)
    second = build_sft_data(cfg, tiny_tokenizer, None)
    assert len(builds) == 1
    assert rows(second) == rows(first)
    assert second.sources == first.sources


def test_changed_data_is_rebuilt(tmp_path, tiny_tokenizer, builds):
    src = write_source(tmp_path / "src", ["yes", "no"])
    cfg = config(tmp_path, src)
    before = build_sft_data(cfg, tiny_tokenizer, None)
    write_source(tmp_path / "src", ["yes", "blue"])
    after = build_sft_data(cfg, tiny_tokenizer, None)
    assert len(builds) == 2
    assert "blue" in " ".join(tiny_tokenizer.decode(ids) for ids in rows(after))
    assert rows(before) != rows(after)


def test_a_different_tokenizer_is_rebuilt(tmp_path, tiny_tokenizer, builds):
    cfg = config(tmp_path, write_source(tmp_path / "src", ["The sky is blue."]))
    other = build_tokenizer([" Human: Q0? Assistant: The sky is blue."] * 5, vocab_size=300)
    first = build_sft_data(cfg, tiny_tokenizer, None)
    second = build_sft_data(cfg, other, None)
    assert len(builds) == 2
    assert rows(second) == [
        other(" Human: Q0? Assistant:")["input_ids"]
        + other(" The sky is blue.<|endoftext|>", add_special_tokens=False)["input_ids"]
    ]
    assert rows(first) != rows(second)


@pytest.mark.parametrize(
    "change", [{"max_seq_len": 8}, {"seed": 7}, {"data_split": "9,1,0"}, {"eot_token": "</s>"}]
)
def test_every_setting_that_changes_rows_is_part_of_the_key(
    tmp_path, tiny_tokenizer, builds, change
):
    cfg = config(tmp_path, write_source(tmp_path / "src", ["a b c d e f g h i j k"] * 10))
    build_sft_data(cfg, tiny_tokenizer, None)
    build_sft_data(dataclasses.replace(cfg, **change), tiny_tokenizer, None)
    assert len(builds) == 2
    assert len([n for n in os.listdir(cfg.data_output_path) if not n.endswith(".lock")]) == 2


def test_rebuild_flag_rebuilds_entries_older_than_the_process(
    tmp_path, tiny_tokenizer, builds, monkeypatch
):
    cfg = dataclasses.replace(
        config(tmp_path, write_source(tmp_path / "src", ["yes"])), rebuild_data_cache=True
    )
    first = build_sft_data(cfg, tiny_tokenizer, None)
    # An entry this process made is fresh: other ranks read what rank 0 just rebuilt.
    assert rows(build_sft_data(cfg, tiny_tokenizer, None)) == rows(first)
    assert len(builds) == 1
    monkeypatch.setattr(cache_module, "PROCESS_START", time.time() + 1)  # as if started later
    again = build_sft_data(cfg, tiny_tokenizer, None)
    assert len(builds) == 2
    assert rows(again) == rows(first)
    assert rows(
        build_sft_data(dataclasses.replace(cfg, rebuild_data_cache=False), tiny_tokenizer, None)
    ) == rows(first)


def test_the_cache_holds_arrow_and_json_only(tmp_path, tiny_tokenizer):
    cfg = config(tmp_path, write_source(tmp_path / "src", ["yes"]))
    build_sft_data(cfg, tiny_tokenizer, None)
    suffixes = {
        os.path.splitext(f)[1] for _, _, files in os.walk(cfg.data_output_path) for f in files
    }
    assert suffixes <= {".arrow", ".json", ".lock"}


def test_a_failed_build_leaves_no_entry(tmp_path, tiny_tokenizer, monkeypatch):
    cfg = config(tmp_path, write_source(tmp_path / "src", ["yes"]))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "tokenize_rows", crash)
    with pytest.raises(KeyboardInterrupt):
        build_sft_data(cfg, tiny_tokenizer, None)
    assert [n for n in os.listdir(cfg.data_output_path) if not n.endswith(".lock")] == []
    monkeypatch.undo()
    assert len(build_sft_data(cfg, tiny_tokenizer, None).train) == 1


BUILDER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from transformers import AutoTokenizer
    import utils.data.build as b
    from utils.data.config import DataConfig
    real = b.build_uncached
    def logged(*a, **k):
        print("BUILT", flush=True)
        return real(*a, **k)
    b.build_uncached = logged
    cfg = DataConfig(data_path=[sys.argv[3]], data_split="10,0,0", data_output_path=sys.argv[4],
                     rebuild_data_cache=sys.argv[5] == "rebuild")
    data = b.build_sft_data(cfg, AutoTokenizer.from_pretrained(sys.argv[2]), None)
    print("ROWS", json.dumps([r["input_ids"] for r in data.train]), flush=True)
    """
)


@pytest.mark.parametrize("flag", ["", "rebuild"])
def test_two_concurrent_builders_build_once_and_agree(tmp_path, tiny_tokenizer, flag):
    """Like ranks (or runs) sharing a cache; with the rebuild flag an old entry is rebuilt once."""
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    src = write_source(tmp_path / "src", [f"answer {i}" for i in range(200)])
    if flag:  # an entry from an earlier run, an hour ago
        build_sft_data(config(tmp_path, src), tiny_tokenizer, None)
        for entry in (tmp_path / "cache").glob("sft-*/sources.json"):
            os.utime(entry, (time.time() - 3600, time.time() - 3600))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-c",
        BUILDER,
        REPO,
        str(tmp_path / "tok"),
        src,
        str(tmp_path / "cache"),
        flag,
    ]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    stdout = [out for out, _ in outputs]
    assert sum(out.count("BUILT") for out in stdout) == 1
    results = [next(line for line in out.splitlines() if line.startswith("ROWS")) for out in stdout]
    assert results[0] == results[1]
    assert len(json.loads(results[0][5:])) == 200


SLOW_BUILDER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from transformers import AutoTokenizer
    import utils.data.build as b
    from utils.data.config import DataConfig
    real = b.tokenize_rows
    def slow(*a, **k):
        rows = real(*a, **k)  # partial Arrow files are on disk now
        print("PARTIAL", flush=True)
        time.sleep(60)
        return rows
    b.tokenize_rows = slow
    cfg = DataConfig(data_path=[sys.argv[3]], data_split="10,0,0", data_output_path=sys.argv[4])
    b.build_sft_data(cfg, AutoTokenizer.from_pretrained(sys.argv[2]), None)
    """
)


def test_a_killed_build_leaves_no_work_folder_after_the_next_build(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    src = write_source(tmp_path / "src", [f"answer {i}" for i in range(50)])
    cache = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-c", SLOW_BUILDER, REPO, str(tmp_path / "tok"), src, str(cache)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "PARTIAL"
    finally:
        proc.kill()  # SIGKILL: no finally, no cleanup
        proc.wait()
    assert [p for p in cache.iterdir() if p.name.startswith(".build-")]  # the litter
    # A killed build of another entry, whose lock nobody holds, is swept too.
    (cache / ".build-sft-0123456789abcdef01234567-1").mkdir()

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")  # the killed build's entry
    data = build_sft_data(config(tmp_path, src), tokenizer, None)
    assert len(data.train) == 50
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".build-")]
