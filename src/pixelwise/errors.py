"""User-facing errors. The CLI prints ``str(err)`` as one line and exits 2; nothing else.

Raise :class:`UserError` for anything the user can fix (bad path, bad config key, corrupt
file), with a message that names the file and says what to do.
"""


class UserError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""


def listed(values, k: int = 6) -> str:
    """The first ``k`` of ``values`` for a one-line message: ``a, b, c, ...``."""
    values = list(values)
    return ", ".join(map(str, values[:k])) + (", ..." if len(values) > k else "")
