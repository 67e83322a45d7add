"""Argument types for the command line, each refusing a bad value with argparse's one-line
error naming the flag before anything connects; and the few words it prints for numbers."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import timedelta

from rmqdelay.core.delays import parse_duration
from rmqdelay.core.errors import RmqDelayError


def signed_duration(text: str) -> timedelta:
    """A duration with a unit, such as 500ms or 1h30m; a leading '-' makes it negative
    (for the command to refuse in its own words). A bare number is refused, as
    everywhere in rmqdelay: '30' could mean seconds or minutes.

    Raises:
        InvalidDelayError: naming the text.
    """
    stripped = text.strip()
    value = parse_duration(stripped.removeprefix("-"))
    return -value if stripped.startswith("-") else value


def duration(text: str) -> timedelta:
    """``signed_duration`` as an argparse type."""
    try:
        return signed_duration(text)
    except RmqDelayError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


#: Flags whose value may start with '-' (a negative duration): argparse would take
#: '--delay -5s' for two flags and say "expected one argument".
DURATION_FLAGS = ("--delay", "--until", "--every", "--backoff-base", "--backoff-cap")


def join_negative_values(argv: list[str]) -> list[str]:
    """``--delay -5s`` as ``--delay=-5s``, so that the value reaches its check."""
    joined: list[str] = []
    for word in argv:
        previous = joined[-1] if joined else ""
        if previous in DURATION_FLAGS and word[:1] == "-" and word[1:2].isdigit():
            joined[-1] = f"{previous}={word}"
        else:
            joined.append(word)
    return joined


def int_between(low: int, high: int) -> Callable[[str], int]:
    """An integer from ``low`` to ``high``, both included."""

    def read(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    read.__name__ = "int"  # argparse names the type in some messages
    return read


def hops(n: int) -> str:
    """'1 hop', '2 hops'."""
    return f"{n} hop" if n == 1 else f"{n} hops"
