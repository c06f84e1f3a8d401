"""Fault injection for state-database writes, shared by the worker and outbox tests."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

LOCKED = "database is locked"


def flaky(real: Callable[..., object], failures: int) -> tuple[Callable[..., object], list[int]]:
    """``real`` raising ``database is locked`` on its first ``failures`` calls; the list counts every call."""
    calls: list[int] = []

    def wrapper(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) <= failures:
            raise sqlite3.OperationalError(LOCKED)
        return real(*args, **kwargs)

    return wrapper, calls
