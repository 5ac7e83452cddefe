"""Errors that are the user's to fix (flags, data, work dir): entry points print them as one
clear message without a traceback (``--verbose`` shows it)."""


class UserError(ValueError):
    """A problem with the user's settings, data or work dir; the message says what and how to proceed."""
