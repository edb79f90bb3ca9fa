"""Stopping on Ctrl-C (SIGINT) and SIGTERM (a spot or preemptible VM's
notice, ~30 s ahead).

Inside `with stop_on_signals():` SIGINT raises KeyboardInterrupt and SIGTERM
raises `Terminated` in the main thread: the work stops where it is,
sequences in flight are dropped, and what finished is already committed. A
commit in progress, in any thread, is finished first: while code runs
inside `finishing_write()` the signal is only recorded, and raised when the
last such block ends.

A signal is never lost. Python drops an exception raised while a finalizer
or a callback from C code runs (it prints "Exception ignored ..."), and a
signal's exception is raised in whatever Python code the main thread runs
when it arrives. So the signal is also recorded, and the next
`finishing_write()` (the next commit) raises it if the run went on, as does
`raise_if_stopped()`, for loops that wait without committing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(BaseException):
    """The process received SIGTERM (a BaseException, like KeyboardInterrupt,
    so that no `except Exception` swallows it)."""


_EXCEPTIONS = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}

# Commits in progress, over all threads (a sweep commits from one thread per
# device group). Changed under the lock; the signal handler only reads it,
# so it never waits for a lock that the code it interrupted holds.
_writes_in_progress = 0
_writes_lock = threading.Lock()
# The exception of the stop signal received, once one was.
_received: type[BaseException] | None = None
# Stop signals received so far, and whether the handlers are being put back
# (a signal then is only counted, and raised once they are).
_signals_seen = 0
_restoring = False


def _on_signal(signum, frame) -> None:
    global _received, _signals_seen
    _received = _EXCEPTIONS[signum]
    _signals_seen += 1
    if not _writes_in_progress and not _restoring:
        raise _received()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Stops the work inside on SIGINT and SIGTERM (enter it in the main
    thread); on leaving, the handlers before it are back and no signal
    received inside is left to stop later work.

    A SIGINT the process was started to ignore (a background job of a
    script) stays ignored, as Python leaves it; SIGTERM is always handled.
    """
    global _received, _restoring
    previous = {signum: signal.getsignal(signum) for signum in _EXCEPTIONS}
    _received = None
    signal.signal(signal.SIGTERM, _on_signal)
    if previous[signal.SIGINT] is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _on_signal)
    try:
        yield
    finally:
        # A signal while the handlers are put back cannot cut that short
        # (Python may run a handler inside signal.signal); it is raised after.
        _restoring = True
        seen = _signals_seen
        try:
            for signum, handler in previous.items():
                # None: a handler installed outside Python, which Python
                # cannot put back; the default disposition stands in for it.
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        finally:
            _restoring = False
        late, _received = _received, None
        if _signals_seen != seen:
            raise late()


def raise_if_stopped() -> None:
    """Raises a stop signal received whose exception was lost, outside any
    commit: a loop that waits (for other processes) calls it each round, so
    a lost signal does not leave it waiting until its timeout."""
    with _writes_lock:
        if _received is not None and not _writes_in_progress:
            raise _received()


@contextlib.contextmanager
def finishing_write(*, while_stopping: bool = False) -> Iterator[None]:
    """A block that no stop signal interrupts: one received inside raises
    once the last such block (in any thread) has ended, and one received
    before it (whose exception was lost) raises before it starts.

    while_stopping: for a last write made while a stop signal's exception
    is already being handled (the caller raises it again): a further signal
    does not cut it short, and none is raised before or after it.
    """
    global _writes_in_progress
    with _writes_lock:
        if _received is not None and not _writes_in_progress and not while_stopping:
            raise _received()
        _writes_in_progress += 1
    try:
        yield
    finally:
        with _writes_lock:
            _writes_in_progress -= 1
            last = not _writes_in_progress
    if last and _received is not None and not while_stopping:
        raise _received()
