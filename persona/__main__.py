"""``python -m persona`` runs the CLI."""

from .cli import main

main()
