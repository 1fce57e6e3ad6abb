"""Settings of the model: which one, how it computes, and LoRA.

Each field is also the command-line flag of the same name (see utils/flags.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from utils.flags import flag

CHUNKED_LOSS = ("auto", "on", "off")
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")


@dataclass(kw_only=True)
class ModelConfig:
    model_name_or_path: str = flag(
        help="A hub model name or a local folder with a saved model and tokenizer."
    )
    tokenizer_name_or_path: str | None = flag(
        None,
        "The tokenizer's folder or hub name, when --model_name_or_path holds no tokenizer "
        "of its own (default: the model's).",
    )
    trust_remote_code: bool = flag(
        False, "Allow model code from the model's repository (off by default: it runs code)."
    )
    dropout: float | None = flag(
        None, "Override the model's dropout probabilities (default: the model's own)."
    )
    gradient_checkpointing: bool = flag(
        False, "Recompute activations in the backward pass to save memory."
    )
    compute_fp32_loss: bool = flag(
        False, "Compute the loss in fp32 even when training in fp16/bf16."
    )
    chunked_loss: str = flag(
        "auto",
        "Compute the output layer and the loss in chunks of tokens, never holding the full "
        "[batch, seq, vocab] logits (4-5x lower peak memory, not slower; softmax in fp32). "
        "'auto': wherever it equals the model's plain loss; 'off': the plain loss.",
        choices=CHUNKED_LOSS,
    )
    attn_implementation: str = flag(
        "auto",
        "Attention kernel. 'auto': transformers' default (sdpa), except for --packing on a "
        "GPU: flash_attention_2 in 16 bits where flash-attn imports (packs without padding or "
        "mask), else flex_attention (skips the blocks between packed examples).",
        choices=ATTENTION,
    )
    compile: bool = flag(
        False,
        "torch.compile the model (off by default: measured no faster on a CPU, and its first "
        "step compiles for minutes; the loss is then the plain one).",
    )

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer_name_or_path or self.model_name_or_path


DEFAULT_LORA_SCOPE = "decoder.layers."


@dataclass(kw_only=True)
class LoraConfig:
    lora_dim: int = flag(0, "LoRA rank; > 0 enables LoRA.")
    lora_module_name: str = flag(
        DEFAULT_LORA_SCOPE,
        "LoRA wraps every linear layer whose qualified name contains this.",
    )
    only_optimize_lora: bool = flag(False, "Train only the LoRA weights; freeze the rest.")
    lora_learning_rate: float = flag(5e-4, "Learning rate of the LoRA weights.")
    save_lora_adapter: bool = flag(
        False,
        "Also write the PEFT adapter folder (output_dir/lora_adapter); the model itself is "
        "always saved with LoRA merged into its weights.",
    )

    @property
    def enabled(self) -> bool:
        return self.lora_dim > 0
