"""Loading a model for evaluation and generating answers to prompts in batches.

Batches are left-padded so every prompt ends at the same position and new tokens
follow it directly; the attention mask keeps the padding out of the answers, so a
batch gives the same text as generating one prompt at a time.
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, set_seed

from utils.data.config import DataConfig
from utils.errors import UserError
from utils.flags import flag, shared_flag
from utils.model.folder_checks import unusable_tokenizer, weight_problems
from utils.model.publish import interrupted_save_problem

DECODINGS = ("greedy", "beam", "sample", "contrastive", "diverse_beam")
# transformers 5 moved these two searches into Hub repositories whose code it downloads
# and runs, so they need network access and an explicit --trust_remote_code.
HUB_DECODINGS = {
    "contrastive": "transformers-community/contrastive-search",
    "diverse_beam": "transformers-community/group-beam-search",
}
# Without a penalty every beam group finds the same beams: diverse beam is plain beam search.
DIVERSITY_PENALTY = 1.0


# Which flags each decoding mode reads; validation rejects the others.
MODE_FLAGS: dict[str, set[str]] = {
    "greedy": set(),
    "beam": {"num_beams", "num_return_sequences"},
    "sample": {"top_k", "num_return_sequences"},
    "contrastive": {"top_k", "penalty_alpha"},
    "diverse_beam": {"num_beams", "num_beam_groups", "num_return_sequences"},
}


def _for_modes(name: str) -> str:
    """Which --decoding modes read the flag `name`, for its help."""
    return ", ".join(mode for mode, flags in MODE_FLAGS.items() if name in flags)


@dataclass(kw_only=True)
class DecodingConfig:
    """How both models generate; MODE_FLAGS says which fields each --decoding reads."""

    decoding: str = flag(
        "greedy",
        "How both models generate. contrastive and diverse_beam run code transformers "
        "downloads from the Hub: they need --trust_remote_code.",
        choices=DECODINGS,
    )
    max_new_tokens: int = flag(100, "Longest answer in tokens.")
    num_beams: int = flag(4, f"Beams ({_for_modes('num_beams')}).")
    num_beam_groups: int = flag(2, f"Beam groups ({_for_modes('num_beam_groups')}).")
    top_k: int = flag(4, f"Candidates per step ({_for_modes('top_k')}).")
    penalty_alpha: float = flag(0.6, f"Degeneration penalty ({_for_modes('penalty_alpha')}).")
    num_return_sequences: int = flag(
        1, f"Answers per prompt ({_for_modes('num_return_sequences')})."
    )
    batch_size: int = flag(8, "Prompts (and perplexity rows) per forward pass.")
    seed: int = shared_flag(DataConfig, "seed")

    def settings(self) -> dict[str, object]:
        """The settings that shape this decoding (what a report header shows)."""
        used = {"decoding", "max_new_tokens", "seed"} | MODE_FLAGS[self.decoding]
        return {key: value for key, value in asdict(self).items() if key in used}


def select_device_dtype() -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16 (fp16 on GPUs without bf16), otherwise CPU in fp32."""
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.device("cuda"), dtype
    return torch.device("cpu"), torch.float32


def check_model_path(flag: str, path: str) -> str | None:
    """The problem with a --model_name_or_path_* value, or None if it can be loaded.

    A value that names a folder must hold a saved model; a value that looks like a
    path ("./out", "/ckpt", "~/x", "out/", "a/b/c") but does not exist is reported
    instead of being sent to the Hub as a model name.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        if problem := interrupted_save_problem(str(local)):
            return f"{flag} {path}: {problem}"
        if not (local / "config.json").is_file():
            return f"{flag} {path}: the folder has no config.json; point it at a saved model folder"
        return next(iter(weight_problems(str(local), flag)), None)
    if local.exists():
        return f"{flag} {path}: is a file; point it at a saved model folder or a Hub model name"
    if path.startswith((".", "/", "~")) or path.endswith("/") or path.count("/") > 1:
        return f"{flag} {path}: no such model folder; check the path (did training finish?)"
    return None


def load_eval_tokenizer(path: str, eot_token: str, add_eot_token: bool, trust_remote_code: bool):
    """The model's tokenizer, left-padding (for generation), with --eot_token added if asked."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as error:
        where = "its folder has no usable tokenizer" if Path(path).is_dir() else "the Hub said"
        raise UserError(f"cannot load the tokenizer of {path}: {where}: {error}") from None
    if reason := unusable_tokenizer(tokenizer):
        raise UserError(
            f"{path} has no usable tokenizer ({reason}); copy the model's tokenizer files "
            "into it (tokenizer.save_pretrained)"
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        # Padding never reaches the model's answers (attention mask), so any token serves.
        tokenizer.pad_token = tokenizer.eos_token
    if add_eot_token and eot_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [eot_token]})
    return tokenizer


def load_eval_model(
    path: str, tokenizer, device: torch.device, dtype: torch.dtype, trust_remote_code: bool
) -> PreTrainedModel:
    """The saved causal LM in `dtype` on `device`, in eval mode."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        raise UserError(
            f"cannot load the model {path} (is the folder complete?): {error}"
        ) from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # Only when --add_eot_token just added the token: its embedding is untrained.
        model.resize_token_embeddings(len(tokenizer))
    return model.to(device).eval()


def describe_tokenizer_mismatch(baseline, finetune) -> str | None:
    """Why the two tokenizers would split text differently, or None if they agree."""
    if type(baseline) is not type(finetune):
        return f"classes {type(baseline).__name__} vs {type(finetune).__name__}"
    if baseline.get_vocab() != finetune.get_vocab():
        return f"vocabularies of {len(baseline)} vs {len(finetune)} tokens"
    if baseline.all_special_tokens != finetune.all_special_tokens:
        return f"special tokens {baseline.all_special_tokens} vs {finetune.all_special_tokens}"
    return None


def build_generate_kwargs(cfg: DecodingConfig, tokenizer, eot_token: str) -> dict[str, object]:
    """Arguments for model.generate: the decoding mode plus stopping at eos and --eot_token.

    Every mode's sampling knobs are set explicitly so a generation_config.json saved
    with the model (say, do_sample with a temperature) cannot change the decoding.
    """
    kwargs: dict[str, object] = {
        "max_new_tokens": cfg.max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": cfg.decoding == "sample",
        "num_beams": cfg.num_beams if cfg.decoding in ("beam", "diverse_beam") else 1,
        "num_return_sequences": cfg.num_return_sequences,
    }
    if cfg.decoding == "sample":
        kwargs |= {"top_k": cfg.top_k, "top_p": 1.0, "temperature": 1.0}
    elif cfg.decoding == "contrastive":
        kwargs |= {"top_k": cfg.top_k, "penalty_alpha": cfg.penalty_alpha}
    elif cfg.decoding == "diverse_beam":
        kwargs |= {"num_beam_groups": cfg.num_beam_groups, "diversity_penalty": DIVERSITY_PENALTY}
    if cfg.decoding in HUB_DECODINGS:
        kwargs |= {"custom_generate": HUB_DECODINGS[cfg.decoding], "trust_remote_code": True}

    stop_ids = [tokenizer.eos_token_id]
    eot_ids = tokenizer.encode(eot_token, add_special_tokens=False)
    if len(eot_ids) == 1:
        stop_ids.append(eot_ids[0])
    else:
        # The token is not in the vocabulary (no --add_eot_token): stop on its text instead.
        kwargs |= {"stop_strings": [eot_token], "tokenizer": tokenizer}
    kwargs["eos_token_id"] = sorted({i for i in stop_ids if i is not None})
    return kwargs


def generate_answers(
    model: PreTrainedModel,
    tokenizer,
    prompts: list[str],
    cfg: DecodingConfig,
    eot_token: str,
    add_special_tokens: bool = True,
) -> list[list[str]]:
    """For each prompt, its `num_return_sequences` answers (text after the prompt, cut at eot).

    Prompts rendered by a chat template already hold their special tokens (BOS included):
    pass add_special_tokens=False, as transformers' apply_chat_template does.
    """
    set_seed(cfg.seed)
    kwargs = build_generate_kwargs(cfg, tokenizer, eot_token)
    answers: list[list[str]] = []
    for start in range(0, len(prompts), cfg.batch_size):
        batch = tokenizer(
            prompts[start : start + cfg.batch_size],
            return_tensors="pt",
            padding=True,
            return_token_type_ids=False,
            add_special_tokens=add_special_tokens,
        ).to(model.device)
        try:
            with torch.no_grad():
                output = model.generate(**batch, **kwargs)
        except OSError as error:
            if cfg.decoding not in HUB_DECODINGS:
                raise
            raise UserError(
                f"--decoding {cfg.decoding} needs hf.co/{HUB_DECODINGS[cfg.decoding]}, which "
                f"could not be loaded ({error}); connect to the Hub or pick another --decoding"
            ) from None
        # output: (batch * num_return_sequences, prompt_len + new); left padding means
        # every answer starts at the same column.
        texts = [
            clean_answer(tokenizer.decode(row), tokenizer, eot_token)
            for row in output[:, batch["input_ids"].shape[1] :]
        ]
        n = cfg.num_return_sequences
        answers += [texts[i : i + n] for i in range(0, len(texts), n)]
    return answers


def clean_answer(text: str, tokenizer, eot_token: str) -> str:
    """The answer up to the first eot/eos, without padding or other special tokens."""
    for stop in (eot_token, tokenizer.eos_token):
        if stop:
            text = text.split(stop, 1)[0]
    for special in tokenizer.all_special_tokens:
        text = text.replace(special, "")
    # An untrained model can emit control bytes; printed raw, ESC sequences drive the terminal.
    text = "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else "\ufffd" for c in text)
    return text.strip()
