"""``python -m irrepscope`` runs the CLI."""

from irrepscope.cli import main

main()
