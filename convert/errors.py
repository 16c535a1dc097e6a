"""The one exception type the converter raises for bad input."""


class ConvertError(ValueError):
    """Bad or unsupported input: the message is one sentence naming the path, field or value."""
