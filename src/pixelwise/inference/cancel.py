"""Stopping a prediction from another thread: between model batches, a semantic predictor checks
whether the job it runs for was cancelled (the server cancels a job whose client went away, that
ran past its time limit, or that was still running when the server was asked to stop).

A thread opts in with :func:`cancellable`; outside such a block :func:`check` does nothing, so
``predict`` and ``eval`` are unaffected.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

_current = threading.local()


class Cancelled(Exception):
    """The prediction was stopped because its cancel event was set."""


class TimedOut(Cancelled):
    """The prediction was stopped because it ran past its time limit."""

    @classmethod
    def after(cls, seconds: float) -> TimedOut:
        return cls(f"the prediction ran longer than the server's limit of {seconds:g} s")


@contextlib.contextmanager
def cancellable(event: threading.Event, seconds: float | None = None) -> Iterator[None]:
    """Within this block, predictions on this thread raise :class:`Cancelled` at their next model
    batch once ``event`` is set, and :class:`TimedOut` once ``seconds`` (from now) have passed."""
    previous = getattr(_current, "job", None)
    _current.job = (event, None if seconds is None else time.monotonic() + seconds, seconds)
    try:
        yield
    finally:
        _current.job = previous


def check() -> None:
    """Raise :class:`Cancelled` (or :class:`TimedOut`) if this thread's job must stop."""
    job = getattr(_current, "job", None)
    if job is None:
        return
    event, deadline, seconds = job
    if event.is_set():
        raise Cancelled("the prediction was cancelled")
    if deadline is not None and time.monotonic() > deadline:
        raise TimedOut.after(seconds)
