"""No rank waits forever (issue 15 item 6).

Before: a rank waiting for rank 0 (its data-cache build, its save) sat in a collective
until the process group's timeout (30 minutes with older DeepSpeed; and the 10 minutes of
newer ones cut a legitimately long cache build short), then died with a traceback that
never mentioned rank 0.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
from torch.distributed import TCPStore

import utils.distributed as distributed
from tests.conftest import REPO
from utils.distributed import RankZeroFailed, wait_for_rank_0


@pytest.fixture
def store():
    return TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=10), wait_for_workers=False)


def test_a_waiting_rank_relays_rank_0s_failure(store):
    store.set("k", "failed: DataError: all 3 rows of data.jsonl were skipped")
    with pytest.raises(RankZeroFailed) as caught:
        wait_for_rank_0(store, "k", "build the data cache")
    assert "rank 0 failed to build the data cache" in str(caught.value)
    assert "DataError: all 3 rows of data.jsonl were skipped" in str(caught.value)


def test_a_waiting_rank_gives_up_after_its_bound(store, monkeypatch):
    monkeypatch.setattr(distributed, "LONG_WAIT", timedelta(seconds=1))
    monkeypatch.setitem(distributed._settings, "timeout", timedelta(seconds=1))
    with pytest.raises(RankZeroFailed, match="waited 1 seconds for rank 0 to write the model"):
        wait_for_rank_0(store, "never-set", "write the model")


def test_a_waiting_rank_stops_when_rank_0s_store_is_gone():
    server = TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
    client = TCPStore("127.0.0.1", server.port, 1, False, timeout=timedelta(seconds=10))
    del server  # rank 0's process, which hosts the store, is gone
    with pytest.raises(RankZeroFailed, match=r"rank 0 stopped while rank .* waited for it"):
        wait_for_rank_0(client, "k", "save the model")


WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import deepspeed
    import main
    from utils.data.common import DataError

    real_init = deepspeed.init_distributed
    def spy(**kwargs):
        print("TIMEOUT", kwargs["timeout"], flush=True)
        return real_init(**kwargs)
    deepspeed.init_distributed = spy

    def fail(*args, **kwargs):
        raise DataError("all 3 rows of data.jsonl were skipped: no response column")
    if main.is_main_process():
        main.build_sft_data = fail
    sys.exit(main.main(sys.argv[2:]))
    """
)


@pytest.mark.slow
def test_when_rank_0_fails_preparing_data_the_other_rank_stops_and_points_at_it(
    tiny_model_dir, tmp_path
):
    data = tmp_path / "data"
    data.mkdir()
    row = {"prompt": " Human: Say yes. Assistant:", "chosen": " Yes."}
    for name in ("train", "eval"):
        (data / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    argv = [
        "--model_name_or_path", str(tiny_model_dir), "--data_path", str(data),
        "--data_split", "10,0,0", "--data_output_path", str(tmp_path / "cache"),
        "--output_dir", str(tmp_path / "out"), "--dist_timeout_minutes", "1",
    ]  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Two independent processes, as on two nodes: no launcher kills rank 1 for us.
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE="1")
        cmd = [sys.executable, "-c", WORKER, REPO, *argv]
        procs.append(subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))  # fmt: skip
    results = [p.communicate(timeout=300) for p in procs]
    (_, err0), (out1, err1) = results
    assert [p.returncode for p in procs] == [2, 2], err0[-2000:] + err1[-2000:]
    assert "error: all 3 rows of data.jsonl were skipped" in err0
    assert "error: rank 0 failed to build the data cache, so rank 1 stops too" in err1
    assert "all 3 rows of data.jsonl were skipped" in err1 and "Traceback" not in err1
    assert "TIMEOUT 0:01:00" in out1


@pytest.mark.parametrize("value", ["0", "nan", "inf"])
def test_a_timeout_that_cannot_work_is_refused(tiny_model_dir, value):
    from utils.cli.parse import parse_args
    from utils.cli.validate import flag_problems

    cfg = parse_args(["--model_name_or_path", str(tiny_model_dir), "--output_dir", "out",
                      f"--dist_timeout_minutes={value}"])  # fmt: skip
    problems = flag_problems(cfg, on_cuda=False, bf16_supported=False)
    expected = "must be above 0" if value == "0" else "is not a finite number"
    assert [
        p for p in problems if p.startswith(f"--dist_timeout_minutes {float(value)} {expected}")
    ]
