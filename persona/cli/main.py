"""The ``persona`` command: the group, with every command group's commands registered on it.

Every command takes ``--store`` (default ``$PERSONA_HOME`` or ``./adapters``) and ``--json``.
Library errors become one line on stderr and a non-zero exit, never a traceback (``_common``).
Nothing here imports torch: ``persona --help``, ``--version`` and ``list`` start fast; a command
imports the training or serving stack when it runs.
"""

from __future__ import annotations

import sys

import click

from .. import __version__
from . import adapters, compose, export, generate, importing, memory, report, serve, tokens, training
from ._common import PersonaGroup


@click.group(cls=PersonaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="persona")
def main() -> None:
    """Per-user LoRA adapters around one frozen base model.

    \b
    Quick start:
      persona init                       bind ./adapters to the embedded base model
      persona create user:alice          publish user:alice@v1 (a fresh LoRA)
      persona show user:alice            versions, aliases, metrics
      persona verify                     re-hash every published file

    References are KIND:NAME[@vN|@alias], KIND in {user, domain, merged},
    NAME matching [a-z0-9][a-z0-9._-]{0,63}.
    """
    _quiet_progress_bars()


def _quiet_progress_bars() -> None:
    """transformers' per-tensor loading bars are noise on a command line."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        return
    try:  # transformers reads this switch when it is imported; importing it here would cost a second
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:  # pragma: no cover
        return
    disable_progress_bars()


for _group in (adapters, training, report, generate, serve, tokens, compose, importing, export, memory):
    for _command in _group.COMMANDS:
        main.add_command(_command)
