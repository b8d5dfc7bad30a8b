"""The one exception type for user mistakes (bad config, bad data, refused runs).

The CLI catches it once and prints `error: <message>` with exit code 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: the message is one line that names the key or file:line."""
