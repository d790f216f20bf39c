"""``python -m reframe`` runs the CLI."""

from reframe.cli import main

main()
