"""The one exception type for mistakes a user can fix (bad input, bad files)."""


class LlmqError(ValueError):
    """A problem with the user's input, named together with the fix.

    The CLI prints these as one line and exits with status 2; every other
    exception is a bug and keeps its traceback.
    """


class InterruptedWork(LlmqError):
    """A failure outside the run's inputs (a download that broke off): printed like any LlmqError, but a
    streamed run keeps its finished layers for --resume, as it does after a crash."""
