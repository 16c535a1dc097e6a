"""Converting foreign checkpoints (Hugging Face / PyTorch, mlx-lm, GGUF) to mlx-safesig folders.

`convert()` is the entry point (the CLI's `mlx-safesig convert` calls it). Nothing here imports
torch except `reference`.
"""

from .errors import ConvertError
from .pipeline import convert

__all__ = ["ConvertError", "convert"]
