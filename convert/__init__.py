"""Converting foreign checkpoints (Hugging Face / PyTorch, mlx-lm, GGUF) to mlx-safesig folders.

`convert()` is the Python entry point and `convert_command` the click command that the
`mlx-safesig` CLI registers as `convert`. Nothing here imports torch except `reference`.
"""

from .command import convert_command
from .errors import ConvertError
from .pipeline import convert

__all__ = ["ConvertError", "convert", "convert_command"]
