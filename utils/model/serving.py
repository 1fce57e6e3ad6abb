"""What the saved folder tells a server about conversations: the chat template and where to stop.

vLLM, TGI and transformers' pipelines render chats with the tokenizer's `chat_template`
and stop at the generation config's `eos_token_id`s. A model trained through a template
must be served through the same one, and it has learned to close each reply with the
template's end-of-turn token (e.g. <|im_end|>), which is often not the tokenizer's EOS.
"""

from __future__ import annotations

from peft import PeftModel
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from utils.data.chat import ChatTemplate


def carry_chat_template(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate | None
) -> None:
    """Set the template on the tokenizer and its end-of-turn token as a stop token of the
    model's generation config, so save_pretrained writes both. No-op for dschat (None)."""
    if template is None:
        return
    tokenizer.chat_template = template.text
    if template.end_of_turn is None:  # the template closes a reply with nothing to stop at
        return
    plain = model.get_base_model() if isinstance(model, PeftModel) else model
    config = plain.generation_config or GenerationConfig.from_model_config(plain.config)
    config.eos_token_id = stop_token_ids(config.eos_token_id, tokenizer, template.end_of_turn)
    plain.generation_config = config


def stop_token_ids(
    eos_token_id: int | list[int] | None, tokenizer: PreTrainedTokenizerBase, end_of_turn: str
) -> list[int]:
    """The existing stop ids (EOS) and the end-of-turn token's id, each once, EOS first."""
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    ids.append(tokenizer.convert_tokens_to_ids(end_of_turn))
    return list(dict.fromkeys(ids))
