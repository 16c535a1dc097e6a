"""The one exception type the converter raises for bad input."""

from mlx_safesig.model import SafesigError


class ConvertError(SafesigError):
    """Bad or unsupported input: the message is one sentence naming the path, field or value."""
