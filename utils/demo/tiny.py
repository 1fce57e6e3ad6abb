"""Tiny OPT-shaped models and byte-level BPE tokenizers built from scratch, offline.

Used by the embedded CPU demo and by the tests: nothing here touches the hub.
The tokenizer behaves like OPT's (byte-level BPE, `</s>` prepended as BOS,
`<pad>` for padding) so code paths match what real OPT checkpoints exercise.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from utils.model.load import padded_vocab_size

BOS, PAD, UNK, EOT = "</s>", "<pad>", "<unk>", "<|endoftext|>"


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` with OPT's special tokens and BOS behaviour."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, PAD, UNK, EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    bos_id = bpe.token_to_id(BOS)
    # OPT prepends </s> to every sequence; single-sequence template only.
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=BOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[EOT],
    )


def build_opt_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    ffn_dim: int | None = None,
    max_positions: int = 512,
    seed: int = 0,
) -> OPTForCausalLM:
    """A randomly initialised OPT with the tokenizer's vocabulary (rounded up to a multiple of 8)."""
    vocab = padded_vocab_size(tokenizer)
    config = OPTConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        word_embed_proj_dim=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        ffn_dim=ffn_dim or 4 * hidden_size,
        max_position_embeddings=max_positions,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return OPTForCausalLM(config)
