"""The one base class for errors a user can act on.

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class LookalikeError(Exception):
    """An input, config or state problem, with a message that names the key, path or rows involved."""
