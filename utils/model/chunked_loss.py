"""The training loss without the full logits: next-token NLL from the final hidden states, in chunks.

The plain loss materialises `[batch, seq, vocab]` logits, an fp32 copy and its log-softmax:
1.6 GB for 16x512 tokens at OPT's vocabulary, 4 GB at Llama-3's 128k. Here the output
projection and the cross-entropy run over chunks of the *trained* positions only (IGNORE_INDEX
positions never get logits), each chunk's logits upcast to fp32 and the sum kept in fp32
(an fp16 sum overflows at 65,504 nats, a bf16 one rounds). Two ways to get the gradient:

- "recompute": the backward pass recomputes each chunk's logits; at most one chunk of
  logits is ever alive. One more chunk-sized matmul than the plain loss, per trained token.
- "fused": the gradients are computed in the forward pass, chunk by chunk, and kept until
  the backward (no recomputation: the plain loss's FLOPs on trained tokens only, plus a
  weight-sized gradient held from the forward to the backward).

`forward_chunked_nll` computes the loss *inside* the output layer's own call. DeepSpeed ties
its work to module calls and engine outputs: at ZeRO-3 the partitioned head weight is gathered
for that call and for its backward, once each, as for the plain loss, whatever the number of
chunks (so ranks with different token counts still issue the same collectives); and the loss is
the engine's output, so the engine's backward prologue runs before any gradient hook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.data.common import IGNORE_INDEX

# Causal-LM classes whose forward computes `logits = <output embeddings>(final hidden states)`
# and nothing more (checked in transformers' modeling code). Gemma-2 (final soft-capping),
# Cohere (logit_scale) and Granite (logits_scaling) transform logits afterwards: plain loss.
CHUNKED_LOSS_MODEL_TYPES = frozenset(
    {
        "opt", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gpt2", "gpt_neox",
        "bloom", "falcon", "phi", "phi3", "gemma",
    }
)  # fmt: skip
# Config fields that change the logits after the projection, whatever the model type says.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
MODES = ("recompute", "fused")


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a DeepSpeed engine and/or a PEFT wrapper."""
    model = getattr(model, "module", model)  # DeepSpeedEngine
    if hasattr(model, "get_base_model"):  # PeftModel: LoRA layers live inside the base model
        model = model.get_base_model()
    return model


def chunked_loss_config_problem(config) -> str | None:
    """What in a model's config makes the chunked loss differ from its plain loss, if anything
    (checked before the model is built; `chunked_loss_problem` also checks the output layer)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in CHUNKED_LOSS_MODEL_TYPES:
        return f"model type {model_type!r} is not known to compute logits as head(hidden states)"
    transforms = [k for k in LOGIT_TRANSFORMS if getattr(config, k, None) not in (None, 1, 1.0)]
    if transforms:
        return f"the model transforms its logits after the output layer ({', '.join(transforms)})"
    return None


def chunked_loss_problem(model: torch.nn.Module) -> str | None:
    """Why the chunked loss would not equal this model's plain loss, or None when it does."""
    lm = causal_lm(model)
    problem = chunked_loss_config_problem(getattr(lm, "config", None))
    if problem is not None:
        return problem
    head = lm.get_output_embeddings()
    # Exactly nn.Linear: a wrapped head (a PEFT layer) has its own forward that must run.
    if type(head) is not torch.nn.Linear:
        return f"the output layer is a {type(head).__name__}, not a plain Linear"
    return None


def supports_chunked_loss(model: torch.nn.Module) -> bool:
    return chunked_loss_problem(model) is None


def chunked_loss_mode(zero_stage: int) -> str:
    """The fused mode (faster: no recomputation) except at ZeRO-3, where memory comes first:
    there its weight-sized gradient would be a whole, unpartitioned tensor held from the
    forward to the backward pass."""
    return "recompute" if zero_stage == 3 else "fused"


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices into the [B*T] positions whose next token carries a loss ([N], int64).

    Computed from host-side labels before a batch moves to the GPU, it spares `chunked_nll`
    the boolean indexing that would make every call wait for the device."""
    trained = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)  # [B, T]
    trained[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return trained.reshape(-1).nonzero().squeeze(1)


def chunked_nll(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    labels: torch.Tensor,
    chunk_tokens: int,
    mode: str = "recompute",
    kernel: str = "torch",
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL (fp32 scalar) over non-ignored labels, and their count.

    hidden: [B, T, H] final hidden states; labels: [B, T] (shifted by one here, as in
    utils.model.loss.plain_nll); positions: `loss_positions(labels)` when already known.
    Reads `head.weight`: at ZeRO-3 call it inside the head's forward (as
    `forward_chunked_nll` does), where DeepSpeed has gathered the weight. Under
    torch.autocast the projection runs in the autocast dtype, as autocast runs a Linear.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if kernel == "liger" and mode != "fused":
        raise ValueError("the Liger kernel computes the gradients in the forward: mode 'fused'")
    if positions is None:
        positions = loss_positions(labels)
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, T]
    rows = hidden.reshape(-1, hidden.size(-1)).index_select(0, positions)  # [N, H]
    targets = shifted.reshape(-1).index_select(0, positions)  # [N]
    count = positions.numel()  # a shape: no device sync
    weight, bias = head.weight, head.bias
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast would cast each chunk's matmul on its own (and not the fused gradients
        # below); cast once, as autocast does for a Linear, and run the chunks without it.
        dtype = torch.get_autocast_dtype(device_type)
        rows, weight = rows.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device_type, enabled=False):
        if kernel == "liger" and count:
            return _liger_nll(rows, weight, bias, targets), count
        needs_grad = torch.is_grad_enabled() and (
            rows.requires_grad or any(p.requires_grad for p in head.parameters())
        )
        nll = _ChunkedNLL.apply(rows, weight, bias, targets, chunk_tokens, mode, needs_grad)
    return nll, count


def forward_chunked_nll(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    chunk_tokens: int,
    mode: str = "recompute",
    kernel: str = "torch",
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Run `model` (engine, PeftModel or causal LM) on `inputs`; its output layer returns
    the summed NLL over `labels` instead of logits. Returns (nll fp32 scalar, count)."""
    head = causal_lm(model).get_output_embeddings()
    counted: list[int] = []

    def head_forward(hidden: torch.Tensor) -> torch.Tensor:
        nll, count = chunked_nll(hidden, head, labels, chunk_tokens, mode, kernel, positions)
        counted.append(count)
        return nll

    # For this one call the head's forward is replaced (an instance attribute shadows the
    # class's method; module hooks, DeepSpeed's included, still run around it).
    previous = head.__dict__.get("forward")
    head.forward = head_forward
    try:
        nll = model(**inputs, use_cache=False).logits
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous
    return nll, counted[0]


def _liger_nll(
    rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )

    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    out = loss_fn(weight, rows, targets, bias)
    out = getattr(out, "loss", out)  # newer versions may return a (loss, extras) record
    return (out[0] if isinstance(out, tuple) else out).float()


def _chunk_loss_and_grad(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk: summed NLL (fp32) and, when `scale` is given, d(scale * NLL)/d(logits)
    in the compute dtype. Softmax and NLL in fp32 on the upcast logits, like
    `cross_entropy(logits.float())` on the plain path."""
    logits = F.linear(rows, weight, bias).float()  # [C, V]
    lse = torch.logsumexp(logits, dim=-1)  # [C]
    nll = (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum()
    if scale is None:
        return nll, None
    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place: no second [C, V] buffer
    probs[torch.arange(len(targets), device=probs.device), targets] -= 1
    return nll, probs.mul_(scale).to(rows.dtype)


class _ChunkedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk_tokens, mode, needs_grad):
        ctx.chunk_tokens, ctx.mode = chunk_tokens, mode
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        if not needs_grad or mode == "recompute":
            for s in range(0, rows.size(0), chunk_tokens):
                nll, _ = _chunk_loss_and_grad(
                    rows[s : s + chunk_tokens], weight, bias, targets[s : s + chunk_tokens], None
                )
                total += nll
            if needs_grad:
                ctx.save_for_backward(rows, weight, bias, targets)
            return total
        one = torch.ones((), dtype=torch.float32, device=rows.device)
        grads = _ChunkGrads(rows, weight, bias, ctx.needs_input_grad)
        for s in range(0, rows.size(0), chunk_tokens):
            chunk = slice(s, s + chunk_tokens)
            nll, grad_logits = _chunk_loss_and_grad(rows[chunk], weight, bias, targets[chunk], one)
            total += nll
            grads.add(chunk, grad_logits, rows[chunk], weight)
        ctx.grads = grads.result()
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.mode == "fused":
            # The forward computed d(NLL); the loss is linear in it, so scale by grad_total.
            grad_rows, grad_weight, grad_bias = (
                None if g is None else g * grad_total.to(g.dtype) for g in ctx.grads
            )
            del ctx.grads
            return grad_rows, grad_weight, grad_bias, None, None, None, None
        rows, weight, bias, targets = ctx.saved_tensors
        grads = _ChunkGrads(rows, weight, bias, ctx.needs_input_grad)
        chunk_tokens = ctx.chunk_tokens
        for s in range(0, rows.size(0), chunk_tokens):
            chunk = slice(s, s + chunk_tokens)
            _, grad_logits = _chunk_loss_and_grad(
                rows[chunk], weight, bias, targets[chunk], grad_total
            )
            grads.add(chunk, grad_logits, rows[chunk], weight)
        return (*grads.result(), None, None, None, None)


class _ChunkGrads:
    """Gradients of rows, weight and bias, filled chunk by chunk from d(loss)/d(logits).

    The weight's gradient starts as the first chunk's product (no weight-sized zeros to add
    it to, every micro-batch). Over several chunks in 16 bits the sum is kept in fp32 and
    cast once at the end: a 16-bit running sum would round away each chunk's addition.
    """

    def __init__(self, rows, weight, bias, needs: tuple[bool, ...]) -> None:
        self.rows = torch.empty_like(rows) if needs[0] else None
        self.needs_weight, self.weight_like = needs[1], weight
        self.weight: torch.Tensor | None = None
        self.bias = (
            torch.zeros_like(bias, dtype=torch.float32) if bias is not None and needs[2] else None
        )
        self.bias_dtype = None if bias is None else bias.dtype

    def add(self, chunk: slice, grad_logits, rows, weight) -> None:  # grad_logits: [C, V]
        if self.rows is not None:
            torch.mm(grad_logits, weight, out=self.rows[chunk])
        if self.needs_weight:
            if self.weight is None:
                self.weight = torch.mm(grad_logits.t(), rows)  # [V, H]
            elif rows.dtype == torch.float32:
                self.weight.addmm_(grad_logits.t(), rows)
            else:
                self.weight = self.weight.float()  # from the second chunk on: an fp32 sum
                self.weight += torch.mm(grad_logits.t(), rows)
        if self.bias is not None:
            self.bias += grad_logits.float().sum(0)

    def result(self) -> tuple[torch.Tensor | None, ...]:
        weight = self.weight
        if self.needs_weight and weight is None:
            # No rows at all: zeros, so every rank still hands DeepSpeed the same gradients.
            weight = torch.zeros_like(self.weight_like)
        elif weight is not None:
            weight = weight.to(self.weight_like.dtype)
        bias = None if self.bias is None else self.bias.to(self.bias_dtype)
        return self.rows, weight, bias
