"""Turns on an engine: one request at a time uses its KV cache, and nobody waits forever.

A stream holds the engine from its first token to its end, but a stream that nobody reads is
not allowed to hold it against another thread for long, and a closed or garbage-collected stream
lets it go at once. The same thread opening a second request over its own unfinished stream gets
a clear error (waiting would deadlock). Engine.stream reads through :func:`leased_stream`.

>>> for delta in engine.stream("Hi!"): ...  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from .errors import GenerationError

if TYPE_CHECKING:
    from .engine import Engine


@dataclass
class Lease:
    """One request's hold on an engine (its KV cache). A stream is ``stepping`` only inside a
    model step; between the tokens it yields it is idle, and an idle stream that another thread
    waits behind for :attr:`Turns.idle_timeout_s` loses the engine (``revoked``)."""

    thread: int
    stepping: bool = True
    idle_since: float = 0.0
    revoked: bool = False


class Turns:
    """Who uses an engine now: one request at a time. A second request from another thread waits
    while the first one runs; it takes the engine over from a stream that has sat idle (nobody
    reading it) for ``idle_timeout_s``, and that stream then fails with a clear message when read
    again. A waiter whose ``cancel`` is set stops waiting. A lease ends when its request ends,
    when its stream is closed, or when the stream is garbage-collected.

    >>> turns = Turns(); lease = turns.acquire(); turns.release(lease)
    """

    def __init__(self, idle_timeout_s: float = 10.0):
        self.idle_timeout_s = idle_timeout_s
        self._cond = threading.Condition()
        self._lease: Lease | None = None

    def acquire(self, cancel: threading.Event | None = None) -> Lease | None:
        """A lease on the engine, or None when ``cancel`` was set while waiting for one."""
        me = threading.get_ident()
        with self._cond:
            while (held := self._lease) is not None:
                if held.thread == me:
                    raise GenerationError("this engine is still serving an unfinished stream() from this thread; "
                                          "iterate it to the end or call .close() on it before starting another "
                                          "request")
                if not held.stepping and time.monotonic() - held.idle_since >= self.idle_timeout_s:
                    held.revoked = True  # abandoned: nobody has read it for idle_timeout_s
                    break
                if cancel is not None and cancel.is_set():
                    return None
                self._cond.wait(0.05)  # wake up for cancel and for the idle clock too
            self._lease = Lease(me)
            return self._lease

    def pause(self, lease: Lease) -> None:
        """The stream handed a token out and waits to be read again."""
        with self._cond:
            lease.stepping, lease.idle_since = False, time.monotonic()
            self._cond.notify_all()

    def resume(self, lease: Lease) -> None:
        """The stream is read again: step on, unless another request took the engine meanwhile."""
        with self._cond:
            if lease.revoked:
                raise GenerationError(
                    f"this stream was not read for more than {self.idle_timeout_s:g} s while another request "
                    "waited for the engine, so the engine went to that request; start a new stream (and read "
                    "streams to the end, or close() them, to keep the engine)")
            lease.stepping, lease.thread = True, threading.get_ident()

    def release(self, lease: Lease | None) -> None:
        with self._cond:
            if lease is not None and self._lease is lease:
                self._lease = None
                self._cond.notify_all()


@contextlib.contextmanager
def exclusive(engine: "Engine", cancel: threading.Event | None = None) -> Iterator[Lease | None]:
    """Hold the engine for one whole request (see :class:`Turns`); yields None when ``cancel`` was
    set while waiting for it (the caller then runs nothing)."""
    lease = engine._turns.acquire(cancel)
    try:
        yield lease
    finally:
        engine._turns.release(lease)


def leased_stream(engine: "Engine", steps: Iterator[list[str]], cancel: threading.Event | None = None
                  ) -> Iterator[str]:
    """Sequence 0's text deltas from ``steps`` (a :func:`generate_text` generator), holding the
    engine only as :class:`Turns` allows: stepping while a step runs, idle while the delta waits to
    be read. Closing or dropping the stream releases the engine."""
    lease = engine._turns.acquire(cancel)
    if lease is None:
        return
    try:
        while True:
            engine._turns.resume(lease)
            try:
                step = next(steps)
            except StopIteration:
                return
            engine._turns.pause(lease)
            if step[0]:
                yield step[0]
    finally:
        steps.close()
        engine._turns.release(lease)
