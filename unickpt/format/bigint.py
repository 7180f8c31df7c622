"""Integers of any size as the decimal strings of ``["i", ...]`` nodes (docs/FORMAT.md 3.3).

Python refuses str <-> int conversions past 4,300 digits (``sys.get_int_max_str_digits``); the
limit is process-wide, so rather than lifting it (which would race with other threads) the
conversions here work in pieces of at most ``_DIGITS`` digits: exact, thread-safe, and
quasi-linear by splitting in halves.
"""

from __future__ import annotations

MAX_BIG_INT_CHARS = 100_000  # decimal characters (sign included) of an ["i", ...] node
_DIGITS = 4000


def decimal_to_int(s: str) -> int:
    """Parse a validated decimal string of any length (no sign handling beyond a leading '-').

    >>> decimal_to_int("-" + "9" * 9000) == -(10 ** 9000 - 1)
    True
    """
    if s.startswith("-"):
        return -decimal_to_int(s[1:])
    if len(s) <= _DIGITS:
        return int(s)
    half = len(s) // 2
    return decimal_to_int(s[:-half]) * 10 ** half + decimal_to_int(s[-half:])


def int_to_decimal(x: int) -> str:
    """The decimal digits of ``x``, without Python's 4,300-digit limit.

    >>> int_to_decimal(10 ** 4400) == "1" + "0" * 4400
    True
    """
    if x < 0:
        return "-" + int_to_decimal(-x)
    if x < 10 ** _DIGITS:
        return str(x)
    half = (len(hex(x)) * 4 * 3 // 10 + 1) // 2  # about half the decimal digits
    hi, lo = divmod(x, 10 ** half)
    return int_to_decimal(hi) + int_to_decimal(lo).rjust(half, "0")


def encode_big_int(x: int) -> list:
    """The ``["i", "<decimal>"]`` node of an int outside the 64-bit range.

    Raises ``ValueError`` past :data:`MAX_BIG_INT_CHARS` characters (the reader's bound).
    """
    s = int_to_decimal(x)
    if len(s) > MAX_BIG_INT_CHARS:
        raise ValueError(f"int with {len(s)} decimal characters (the format stores at most "
                         f"{MAX_BIG_INT_CHARS})")
    return ["i", s]


__all__ = ["MAX_BIG_INT_CHARS", "decimal_to_int", "int_to_decimal", "encode_big_int"]
