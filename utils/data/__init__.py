"""The SFT data layer: sources -> (prompt, response) -> split -> tokenise -> blend -> cache.

Nothing here imports DeepSpeed or torch.distributed, or reads command-line flags:
callers pass a DataConfig and a tokenizer.
"""

from utils.data.build import build_sft_data, check_data_config
from utils.data.common import IGNORE_INDEX, DataError, SFTData, SourceStats

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "SFTData",
    "SourceStats",
    "build_sft_data",
    "check_data_config",
]
