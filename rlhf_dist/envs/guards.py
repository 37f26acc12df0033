"""Calls that must not hang a rollout: an environment's step, a tool, a reward function.

A slow tool that looks like a hang (veRL #6673) is the commonest complaint of agentic RL. A
guarded call runs in a daemon thread and is waited for ``timeout_s`` seconds; past that the
caller goes on with ``Outcome(timed_out=True)`` and the thread is abandoned (Python cannot
kill a thread: a tool stuck for ever keeps its thread, never the rollout).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Outcome:
    value: Any = None
    error: BaseException | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out


def guarded(fn: Callable, *args, timeout_s: float | None = None) -> Outcome:
    """``fn(*args)``: its value, the exception it raised, or a time-out after ``timeout_s``
    seconds (None or <= 0: no limit, run in this thread)."""
    if not timeout_s or timeout_s <= 0:
        try:
            return Outcome(fn(*args))
        except Exception as e:  # the environment's or the tool's own error, reported
            return Outcome(error=e)
    out = Outcome()

    def run() -> None:
        try:
            out.value = fn(*args)
        except BaseException as e:  # reported to the caller, never lost in the thread
            out.error = e

    thread = threading.Thread(target=run, name=f"guarded-{getattr(fn, '__name__', 'call')}")
    thread.daemon = True
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return Outcome(timed_out=True)
    return out
