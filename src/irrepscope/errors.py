"""The one exception type that irrepscope raises for bad input.

The CLI turns it into a one-line ``error: ...`` message and exit status 2; anything
else is a bug and keeps its traceback.
"""


class IrrepscopeError(Exception):
    """A user-facing error: bad config, bad order list, missing data, corrupt file."""
