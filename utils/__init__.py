"""Building blocks that main.py composes. Kept light: importing a submodule never pulls in DeepSpeed."""
