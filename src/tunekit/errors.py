"""The one exception type for user mistakes (bad config, bad data, refused runs).

The CLI catches it once and prints `error: <message>` with exit code 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: the message is one line that names the key or file:line."""


def first_line(exc: BaseException, limit: int = 200, with_type: bool = True) -> str:
    """"Type: first line of the message" (at most `limit` characters of it; the message alone with with_type=False):
    a library's error, fit for one line. An empty message gives the type's name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return f"{type(exc).__name__}: {lines[0][:limit]}" if with_type else lines[0][:limit]
