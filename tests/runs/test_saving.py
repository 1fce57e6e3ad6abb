"""The final save under faults, file modes, and verification (issue 11 items 12-13, issue 15
items 2 and 5).

Before these fixes: a kill inside the publish window left old weights, new tokenizer files
and no config.json, with nothing marking the folder or completing it; a sharded save kept
the old model.safetensors, which from_pretrained prefers; a full disk ended in a traceback;
model.safetensors, the adapter, metrics.jsonl, the curves and prompt_eval's report were
0600/0700 whatever the umask; verification compared logits only and reloaded every model.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import main as cli
import utils.model.save as save_module
import utils.model.verify as verify_module
from tests.conftest import REPO, EngineStub
from utils.checkpoint.checkpointer import Checkpointer
from utils.checkpoint.config import CheckpointConfig
from utils.distributed import DistInfo
from utils.errors import UserError
from utils.model.publish import JOURNAL, publish_folder
from utils.model.save import DiskFullError, save_hf_model, write_model_folder

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def tiny(model_dir, shift: float = 0.0):
    """The tiny OPT with every weight shifted by `shift` (a distinguishable 'new' model)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(shift)
    return model


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def saved_weights(folder) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


PUBLISHER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from utils.model.save import write_model_folder
    model = AutoModelForCausalLM.from_pretrained(sys.argv[2])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    write_model_folder(model, AutoTokenizer.from_pretrained(sys.argv[2]), state, None, sys.argv[3])
    """
)


def test_a_kill_inside_the_publish_window_is_completed_by_the_next_run(
    tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    old = tiny(tiny_model_dir)
    write_model_folder(old, tiny_tokenizer, state(old), None, str(out))
    env = {**os.environ, "SFT_TEST_PAUSE_PUBLISH": "1"}
    cmd = [sys.executable, "-c", PUBLISHER, REPO, str(tiny_model_dir), str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stderr:
            if "pausing inside the publish window" in line:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    # Mid-publish: marked incomplete and not loadable as a model (no config.json).
    assert (out / JOURNAL).is_file() and not (out / "config.json").exists()
    with pytest.raises((OSError, ValueError)):
        AutoModelForCausalLM.from_pretrained(out)
    from utils.evaluate.generation import check_model_path

    assert "interrupted save" in check_model_path("--model_name_or_path_finetune", str(out))

    # The next training run completes the publish before it does anything else.
    def stop(*args, **kwargs):
        raise UserError("stopped after start-up")

    monkeypatch.setattr(cli, "build_model", stop)
    argv = ["--model_name_or_path", str(tiny_model_dir), "--data_path", str(tmp_path / "data")]
    argv += ["--data_split", "10,0,0", "--data_output_path", str(tmp_path / "cache")]
    write_rows(tmp_path / "data")
    assert cli.main([*argv, "--max_seq_len", "32", "--output_dir", str(out)]) == 2
    assert "completed the save a stopped run left unfinished" in capsys.readouterr().out
    assert not (out / JOURNAL).exists() and not list(out.glob(".saving-*"))
    new = tiny(tiny_model_dir, shift=1.0)
    for name, tensor in saved_weights(out).items():
        torch.testing.assert_close(tensor, new.state_dict()[name], rtol=0, atol=0)


def write_rows(folder) -> None:
    folder.mkdir()
    row = {"prompt": " Human: Say yes. Assistant:", "chosen": " Yes."}
    for name in ("train", "eval"):
        (folder / f"{name}.jsonl").write_text(json.dumps(row) + "\n")


def test_a_sharded_save_over_an_older_model_leaves_none_of_its_files(
    tiny_model_dir, tiny_tokenizer, tmp_path
):
    out = tmp_path / "out"
    old = tiny(tiny_model_dir)
    old.save_pretrained(out, max_shard_size="40KB")  # an older sharded save: many shards
    old.save_pretrained(tmp_path / "single")
    os.replace(tmp_path / "single" / "model.safetensors", out / "model.safetensors")
    (out / "pytorch_model.bin").write_bytes(b"DeepSpeed-Chat's format")
    (out / "lora_adapter").mkdir()
    (out / "lora_adapter" / "adapter_model.safetensors").write_bytes(b"old")
    (out / "training.log").write_text("the run's own files stay\n")
    old_shards = {p.name for p in out.glob("model-*.safetensors")}

    new = tiny(tiny_model_dir, shift=1.0)
    staging = out / ".saving-test"
    new.save_pretrained(staging, max_shard_size="120KB")
    tiny_tokenizer.save_pretrained(staging)
    publish_folder(str(staging), str(out))

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = {p.name for p in out.glob("model-*.safetensors")}
    assert shards == set(index["weight_map"].values()) and shards != old_shards
    for stale in ("model.safetensors", "pytorch_model.bin", "lora_adapter"):
        assert not (out / stale).exists(), stale
    assert (out / "training.log").read_text() == "the run's own files stay\n"
    assert not (out / JOURNAL).exists() and not staging.exists()
    for name, tensor in saved_weights(out).items():
        torch.testing.assert_close(tensor, new.state_dict()[name], rtol=0, atol=0)


def test_a_full_disk_at_the_final_save_says_how_much_room_and_keeps_the_old_model(
    tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    old = tiny(tiny_model_dir)
    write_model_folder(old, tiny_tokenizer, state(old), None, str(out))
    before = saved_weights(out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full)
    advice = "The trained weights are safe in out/checkpoint-7."
    with pytest.raises(DiskFullError) as caught:
        save_hf_model(tiny(tiny_model_dir, 1.0), tiny_tokenizer, str(out), 0, if_disk_full=advice)
    message = str(caught.value)
    assert f"no room for the model in --output_dir {out}" in message
    assert "need about" in message and "GB free" in message and advice in message
    assert not list(out.glob(".saving-*")) and not (out / JOURNAL).exists()
    for name, tensor in saved_weights(out).items():  # the previous model is untouched
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)

    # Where the trained weights survive, for the message's advice.
    checkpointer = Checkpointer(cfg=CheckpointConfig(), output_dir="out", settings={}, dist=CPU)
    assert "the newest checkpoint" not in checkpointer.advice_after_failed_save(9).lower()
    assert "--save_steps N keeps" in checkpointer.advice_after_failed_save(9)
    checkpointer.saved_step = 9
    assert "safe in out/checkpoint-9" in checkpointer.advice_after_failed_save(9)
    checkpointer.saved_step = 6
    assert "newest checkpoint is checkpoint-6 (3 steps" in checkpointer.advice_after_failed_save(9)

    # Checked before training too, from the model's size.
    monkeypatch.setattr(save_module, "free_bytes", lambda path: 10**6)
    with pytest.raises(DiskFullError, match="Nothing has been trained yet"):
        save_module.check_disk_space(old, str(out), "Nothing has been trained yet.")


@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_published_files_follow_the_umask(
    tiny_model_dir, tiny_tokenizer, tmp_path, umask, file_mode, dir_mode
):
    from utils.evaluate.report import save_report
    from utils.model.config import LoraConfig
    from utils.model.lora import apply_lora, lora_state_dict
    from utils.observe.progress import open_metrics, save_curves

    previous = os.umask(umask)
    try:
        model = apply_lora(tiny(tiny_model_dir), LoraConfig(lora_dim=4))
        out = tmp_path / "out"
        merged = dict(save_module.iter_model_tensors(model, 0, keep=True))
        write_model_folder(model, tiny_tokenizer, merged, lora_state_dict(model), str(out))
        open_metrics(str(out / "metrics.jsonl"), 0).close()
        rows = [{"type": "train", "step": 1, "loss": 2.0}]
        assert save_curves(rows, str(out / "training_curves.png"))
        report = {"models": {}, "perplexity": {}, "prompts": [], "decoding": {}}
        save_report(report, out / "report.json")
    finally:
        os.umask(previous)
    files = ["model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl"]
    files += ["training_curves.png", "report.json", "lora_adapter/adapter_model.safetensors"]
    modes = {name: stat.S_IMODE(os.stat(out / name).st_mode) for name in files}
    assert modes == dict.fromkeys(files, file_mode)
    assert stat.S_IMODE(os.stat(out / "lora_adapter").st_mode) == dir_mode


EVAL = [{"input_ids": torch.tensor([[2, 40, 41, 42]]), "attention_mask": torch.ones(1, 4).long()}]


def test_a_tensor_corrupted_after_the_save_is_caught_tensor_by_tensor(
    tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch, capsys
):
    model = tiny(tiny_model_dir, shift=0.5)
    out = tmp_path / "out"
    save_hf_model(model, tiny_tokenizer, str(out), zero_stage=0)
    verify_module.verify_saved_model(EngineStub(model), str(out), EVAL, CPU, False)
    assert "and from_pretrained reproduces the trained model's logits" in capsys.readouterr().out

    # A position the eval rows never reach: the logits cannot see it, the tensors do.
    weights = load_file(out / "model.safetensors")
    weights["model.decoder.embed_positions.weight"][-1, 0] += 1.0
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with torch.no_grad():
        trained = model(**EVAL[0]).logits
        assert (
            verify_module._compare_logits(str(out), EVAL[0], trained, torch.float32, False) is None
        )

    # Forced onto the big-model path: no from_pretrained reload, the tensors still compared.
    monkeypatch.setattr(verify_module, "RELOAD_MAX_BYTES", 0)
    monkeypatch.setattr(verify_module, "AutoModelForCausalLM", None)  # any reload would fail
    with pytest.raises(verify_module.SavedModelMismatch) as caught:
        verify_module.verify_saved_model(EngineStub(model), str(out), EVAL, CPU, False)
    assert "model.decoder.embed_positions.weight differs by up to 1" in str(caught.value)

    save_hf_model(model, tiny_tokenizer, str(out), zero_stage=0)  # a good copy passes
    verify_module.verify_saved_model(EngineStub(model), str(out), EVAL, CPU, False)
    printed = capsys.readouterr().out
    assert "tensors equal the trained ones (the logits check reloads models under" in printed
