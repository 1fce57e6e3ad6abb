"""The SFT data layer: sources -> (prompt, response) -> split -> tokenise -> blend -> cache -> batches.

Nothing here imports DeepSpeed or torch.distributed, or reads command-line flags: callers
pass a DataConfig and a tokenizer. Import from the modules (`utils.data.build`, ...).
"""
