"""The lab's one error type."""


class LabError(RuntimeError):
    """Something the user can act on: the message says what went wrong and what to do."""
