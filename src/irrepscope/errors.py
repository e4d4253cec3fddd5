"""The one exception type that irrepscope raises for bad input.

The CLI turns it into a one-line ``error: ...`` message and exit status 2; anything
else is a bug and keeps its traceback.
"""


class IrrepscopeError(Exception):
    """A user-facing error: bad config, bad order list, missing data, corrupt file."""


def shorten(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error line quotes input, it must not flood the terminal."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
