"""Errors a user can fix. Covered by tests/test_errors.py."""

__all__ = ["InstdiscError"]


class InstdiscError(ValueError):
    """Bad input or state the user can fix.

    The message is one line naming the problem and the offending value. The CLI prints it as
    ``error: <message>`` and exits with status 2, without a traceback.
    """
