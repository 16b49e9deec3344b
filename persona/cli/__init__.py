"""The ``persona`` command line: one module per command group over the library.

``main`` (the click group) registers the commands of ``adapters``, ``training``, ``generate``,
``serve``, ``tokens`` and ``compose``; ``_common`` holds what they share.
"""

from .main import main

__all__ = ["main"]
