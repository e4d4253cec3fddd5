"""Helpers shared by the test modules."""

from irrepscope.cli import main


def run_cli(*args: str) -> int:
    """Run the CLI in-process as a user would; return its exit status (0 when it returned normally)."""
    try:
        main(list(args))
    except SystemExit as exc:
        return exc.code
    return 0
