"""``python -m leukoflow`` runs the CLI."""

from leukoflow.cli import main

main()
