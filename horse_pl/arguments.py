"""Argparse types for numbers with a range, shared by ``edit.py`` and the benchmarks: a value out of range ends
with argparse's one-line error naming the option
(``argument --rounds: must be a whole number of at least 1, not 0``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def number(cast: Callable[[str], float], ok: Callable[[float], bool], words: str):
    """An argparse type: ``cast`` the text and keep it when ``ok(value)``, else say it ``must be {words}``."""
    def parse(text: str):
        value = cast(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {words}, not {text}")
        return value
    parse.__name__ = cast.__name__  # argparse's "invalid int value: 'x'" for text that is no number
    return parse


positive_int = number(int, lambda v: v >= 1, "a whole number of at least 1")
non_negative_int = number(int, lambda v: v >= 0, "a whole number of at least 0")
non_negative_float = number(float, lambda v: v >= 0, "a number of at least 0")
positive_float = number(float, lambda v: v > 0, "a number above 0")
probability = number(float, lambda v: 0 < v <= 1, "a probability above 0 and at most 1")
