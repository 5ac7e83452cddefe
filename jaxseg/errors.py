"""Errors that are the user's to fix (flags, data, work dir): entry points print them as one
clear message without a traceback (``--verbose`` shows it)."""


class UserError(ValueError):
    """A problem with the user's settings, data or work dir; the message says what and how to proceed."""


def first_line(e: BaseException, limit: int = 300, empty: str | None = None) -> str:
    """The first line of ``e``'s message, at most ``limit`` characters, for one-line reports of
    errors from libraries that raise pages of text; ``empty`` (default: the type's name) when
    the message is blank."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else (type(e).__name__ if empty is None else empty)
