"""A bounded worker pool: at most ``workers`` predictions run at once and at most ``queue`` more
wait; a request beyond that is refused at once (:class:`PoolFull`, answered 503 with Retry-After)
instead of piling up uploads and images in memory.

A request takes a :class:`Ticket` with :meth:`InferencePool.admit` before its body is read, so
the bodies held in memory are bounded too, and gives it back when its job ends (or when it fails
before its job was handed to a worker). A job still holds its place until it has
stopped, so the count never undercounts the work in the threads; the server cancels the job of a
client that went away (:meth:`InferencePool.run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pixelwise.inference.cancel import TimedOut, cancellable

T = TypeVar("T")


class PoolFull(Exception):
    """Every worker is busy and the queue is full; ``retry_after`` (seconds) is a fair guess at
    when a place frees up."""

    def __init__(self, retry_after: int, capacity: int) -> None:
        super().__init__(f"the server is busy ({capacity} requests running or waiting); retry in {retry_after} s")
        self.retry_after = retry_after


class Ticket:
    """One admitted request's place in the pool; :meth:`release` gives it back (once)."""

    def __init__(self, pool: InferencePool) -> None:
        self._pool = pool
        self._released = False
        self.submitted = False  # handed to a worker: the worker releases it when the job ends

    def release(self) -> None:
        with self._pool._lock:
            if not self._released:
                self._released = True
                self._pool._admitted -= 1


class InferencePool:
    """``workers`` threads; ``admit()`` refuses when ``workers + queue`` requests are already in.
    ``timeout``: seconds a job may run before it is stopped at its next model batch (None: no limit)."""

    def __init__(self, workers: int = 1, queue: int = 64, timeout: float | None = None) -> None:
        if workers < 1 or queue < 0:
            raise ValueError(f"need workers >= 1 and queue >= 0, got {workers} and {queue}")
        self.workers, self.queue, self.timeout = workers, queue, timeout
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pixelwise-serve")
        self._lock = threading.Lock()
        self._admitted = 0
        self._running = 0
        self._done = 0
        self._seconds = 1.0  # running mean of job time, for Retry-After

    @property
    def capacity(self) -> int:
        return self.workers + self.queue

    def admit(self) -> Ticket:
        """A place for one request, or :class:`PoolFull` when there is none."""
        with self._lock:
            if self._admitted >= self.capacity:
                raise PoolFull(self._retry_after(), self.capacity)
            self._admitted += 1
        return Ticket(self)

    def _retry_after(self) -> int:
        """Seconds until the work ahead is done at the mean job time (at least 1)."""
        return max(1, math.ceil(self._seconds * self._admitted / self.workers))

    async def run(self, ticket: Ticket, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread; the ticket is released when it returns or raises.

        Cancelling the awaiting task (the client went away, the server stops) drops the job if it
        is still waiting, and otherwise stops it at its next model batch
        (:mod:`pixelwise.inference.cancel`), so no thread goes on working for nobody. A job that
        runs past ``timeout`` raises :class:`TimedOut` here at once, even when its model is in the
        middle of one long forward pass (a whole image); its thread stops at its next model batch
        and keeps its place in the pool until then."""
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def job() -> T:
            with contextlib.suppress(RuntimeError):  # the loop may have closed while the job waited
                loop.call_soon_threadsafe(started.set)
            with self._lock:
                self._running += 1
            start = time.perf_counter()
            try:
                with cancellable(stop, self.timeout):
                    return fn(*args)
            finally:
                with self._lock:
                    self._running -= 1
                    self._done += 1
                    weight = 1.0 / min(self._done, 20)  # the mean of the first 20 jobs, then an EMA
                    self._seconds += weight * (time.perf_counter() - start - self._seconds)
                ticket.release()

        future = self._executor.submit(job)
        ticket.submitted = True
        result = asyncio.wrap_future(future)
        # a job stopped after its request was answered (the client went away, its time ran out, the
        # server stops) ends in an exception that nobody awaits: seen here, asyncio does not log it
        # as "Future exception was never retrieved" with a traceback
        result.add_done_callback(_seen)
        limit: asyncio.Future[Any] = asyncio.ensure_future(self._time_limit(started))
        try:
            await asyncio.wait([result, limit], return_when=asyncio.FIRST_COMPLETED)
            if not result.done():
                stop.set()
                assert self.timeout is not None  # the limit returns only with one
                raise TimedOut.after(self.timeout)
            return result.result()
        except asyncio.CancelledError:
            stop.set()
            if future.cancel():  # it never started, so job() will not release the ticket
                ticket.release()
            raise
        finally:
            limit.cancel()

    async def _time_limit(self, started: asyncio.Event) -> None:
        """Returns ``timeout`` seconds after the job started (never without a timeout)."""
        await started.wait()
        if self.timeout is None:
            await asyncio.Event().wait()  # forever
        else:
            await asyncio.sleep(self.timeout)

    def stats(self) -> dict[str, int]:
        """``workers queue running waiting`` (waiting: admitted, not yet running)."""
        with self._lock:
            return {"workers": self.workers, "queue": self.queue, "running": self._running,
                    "waiting": self._admitted - self._running}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _seen(outcome: asyncio.Future[Any]) -> None:
    """Retrieves a finished job's exception, if any (the request was answered without it)."""
    if not outcome.cancelled():
        outcome.exception()
