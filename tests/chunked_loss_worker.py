"""One SGD step under DeepSpeed with the plain and the chunked loss; rank 0 saves the results.

Run by tests/model/test_chunked_loss.py with `torch.distributed.run` (one or two CPU ranks):
    python tests/chunked_loss_worker.py OUT RUN [RUN ...]     RUN = <zero stage>-<plain|recompute|fused>
Each run starts from the same tiny OPT (tied embeddings) and trains this rank's rows; ranks
hold different token counts, so at ZeRO-3 their chunk counts differ.
"""

from __future__ import annotations

import sys

import deepspeed
import torch
from safetensors.torch import save_file

from tests.token_loss_worker import PAD, build_model, build_rows
from utils.data.collate import collate
from utils.distributed import all_reduce_sum, init_distributed
from utils.model.chunked_loss import forward_chunked_nll
from utils.model.loss import model_nll as forward_nll  # the plain (reference) loss

CHUNK_TOKENS = 7  # divides none of the token counts: chunks of unequal size


def one_step(zero_stage: int, loss: str, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    model = build_model()
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        config={
            "train_micro_batch_size_per_gpu": 4,
            "train_batch_size": 4 * world_size,
            "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,  # DeepSpeed's default 1.0 would rescale the update
        },
    )
    rows = build_rows()[rank * 4 : rank * 4 + 4] if world_size > 1 else build_rows()[:4]
    batch = collate(rows, pad_token_id=PAD, loss_on="all")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    if loss == "plain":
        nll, count = forward_nll(engine, batch, True)
    else:
        nll, count = forward_chunked_nll(engine, inputs, batch["labels"], CHUNK_TOKENS, loss)
    (tokens,) = all_reduce_sum([count], torch.device("cpu"))
    # Token mean over all ranks (DeepSpeed averages gradients over ranks, hence world_size).
    engine.backward(nll * world_size / tokens, scale_wrt_gas=False)
    engine.step()
    (total,) = all_reduce_sum([float(nll)], torch.device("cpu"))
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3):
        result = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    result["loss"] = torch.tensor(total / tokens, dtype=torch.float64)
    return result


def main(out: str, runs: list[str]) -> None:
    dist = init_distributed()
    saved = {}
    for run in runs:
        stage, loss = run.split("-")
        for name, value in one_step(int(stage), loss, dist.rank, dist.world_size).items():
            saved[f"{run}/{name}"] = value
    if dist.rank == 0:
        save_file(saved, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
