"""
Command-line value parsers shared by C{twistd echo} and C{echotwist-client}.

Each returns a coercer for a L{twisted.python.usage.Options} parameter that
turns a bad value into a one-line L{usage.UsageError} naming the flag, so a
typo is a usage error (exit 2), never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.python import usage


def whole_number(flag: str, minimum: int = 0, why: str = "") -> Callable[[str], int]:
    """A coercer for an integer flag of at least C{minimum}."""

    def coerce(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise usage.UsageError(f"{flag} must be a whole number, not {value!r}") from None
        if number < minimum:
            raise usage.UsageError(f"{flag} must be at least {minimum}{why}")
        return number

    return coerce


def seconds(flag: str) -> Callable[[str], float]:
    """A coercer for a duration flag: a number of seconds, more than 0."""

    def coerce(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise usage.UsageError(f"{flag} must be a number of seconds, not {value!r}") from None
        if not number > 0:
            raise usage.UsageError(f"{flag} must be more than 0 seconds")
        return number

    return coerce
