"""The one exception type of the library. Only the CLI turns it into exit code 1."""


class LymphError(Exception):
    """A user-facing error: bad input, bad settings or a refused artifact.

    The message names the file, the field (or row / patient) and what was expected,
    so a user can act on it without a traceback.
    """
