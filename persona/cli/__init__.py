"""The ``persona`` command line: one module per command group over the library."""

from .main import main

__all__ = ["main"]
