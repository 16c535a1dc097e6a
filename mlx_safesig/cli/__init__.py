"""`mlx-safesig`: the command line, a thin click skin over the Python API (the only package that
imports click). The model's text goes to stdout; safety markers, progress and speed to stderr.
User errors are one sentence on stderr and exit code 1, never a traceback; Ctrl-C exits 130.

``base`` holds the group and the shared options; ``commands``, ``evaluate``, ``server`` and
``align`` add the commands.
"""

from . import align, commands, evaluate, server  # noqa: F401  (each registers its commands on ``main``)
from .base import main

__all__ = ["main"]
