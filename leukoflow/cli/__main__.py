"""``python -m leukoflow.cli`` runs the CLI (used by the supervisor for child services)."""

from leukoflow.cli import main

main()
