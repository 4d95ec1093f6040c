"""The one exception type for mistakes a user can fix (bad input, bad files)."""


class LlmqError(ValueError):
    """A problem with the user's input, named together with the fix.

    The CLI prints these as one line and exits with status 2; every other
    exception is a bug and keeps its traceback.
    """
