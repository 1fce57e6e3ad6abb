"""What start-up decided, once, for every later step to read (utils/cli/validate.py makes it).

The flags (utils/config.py) say what the user asked for; a RunSetup says what the run does
with it: the merged DeepSpeed config (a --deepspeed_config may override any flag), the
attention and loss paths with the reasons the summary prints, how packed rows are laid out
and who collates them, the model's config, tokenizer and chat template as loaded (each
once), and the size of the process group. The builders, the summary, the memory planner, the
out-of-memory advice and the checkpoints read what start-up decided from here, never derive
it again from the flags, so no report can disagree with what trains.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from utils.data.chat import ChatTemplate
from utils.data.loaders import LoaderWorkers
from utils.engine.ds_config import EngineSetup
from utils.model.loss import LossPath


@dataclass(frozen=True)
class RunSetup:
    engine: EngineSetup  # the merged DeepSpeed config: ZeRO stage, precision, offload
    attention: str | None  # --attn_implementation resolved; None: transformers' default
    attention_reason: str
    pack_layout: str  # how --packing lays rows out for that attention (utils/data/packing.py)
    loss: LossPath  # plain or chunked, decided from the model's config before it loads
    model_config: PretrainedConfig  # as loaded, --dropout applied
    tokenizer: PreTrainedTokenizerBase | None  # None: --estimate_memory reads no files
    template: ChatTemplate | None  # None: DeepSpeed-Chat's format (or --estimate_memory)
    world_size: int  # the process group's, which exists before validation
    loader: LoaderWorkers  # who collates the training batches, into pinned memory or not
