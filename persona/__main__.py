"""``python -m persona`` runs the CLI."""

from .cli.main import main

main()
