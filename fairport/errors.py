"""The one exception type fairport raises for bad input; the CLI prints it as a single line."""


class FairportError(Exception):
    """A user-facing error: its message is printed as one line and the command exits non-zero."""
