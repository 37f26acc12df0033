"""Plain functions as tools (``rollout.tools``) for the tests, and the misbehaving kinds."""

from __future__ import annotations

import time


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first term
        b: the second term
    """
    return a + b


def slow(a: int) -> int:
    """Take far too long.

    Args:
        a: anything
    """
    time.sleep(30)
    return a


def broken(a: int) -> int:
    """Always fail.

    Args:
        a: anything
    """
    raise RuntimeError("the tool broke")


def undocumented(a, b):
    return a
