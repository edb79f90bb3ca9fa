"""Stopping on Ctrl-C (SIGINT) and SIGTERM (a spot or preemptible VM's
notice, ~30 s ahead).

`stop_on_signals()` makes SIGINT raise KeyboardInterrupt and SIGTERM raise
`Terminated` in the main thread: the work stops where it is, sequences in
flight are dropped, and what finished is already committed. A commit in
progress is finished first: code inside `finishing_write()` is not
interrupted, the signal is raised when it ends.

A signal is never lost. Python drops an exception raised while a finalizer
or a callback from C code runs (it prints "Exception ignored ..."), and a
signal's exception is raised in whatever Python code the main thread runs
when it arrives. So the signal is also recorded, and the next
`finishing_write()` (the next commit) raises it if the run went on.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class Terminated(BaseException):
    """The process received SIGTERM (a BaseException, like KeyboardInterrupt,
    so that no `except Exception` swallows it)."""


_EXCEPTIONS = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}

_writes_in_progress = 0
# The exception of the stop signal received, once one was.
_received: type[BaseException] | None = None


def _on_signal(signum, frame) -> None:
    global _received
    _received = _EXCEPTIONS[signum]
    if not _writes_in_progress:
        raise _received()


def stop_on_signals() -> None:
    """Installs the handlers (call from the main thread). A SIGINT the
    process was started to ignore (a background job of a script) stays
    ignored, as Python leaves it; SIGTERM is always handled."""
    global _received
    _received = None
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _on_signal)


@contextlib.contextmanager
def finishing_write() -> Iterator[None]:
    """A block that no stop signal interrupts: one received inside raises
    once it has ended, and one received before it (whose exception was
    lost) raises before it starts."""
    global _writes_in_progress
    if _received is not None and not _writes_in_progress:
        raise _received()
    _writes_in_progress += 1
    try:
        yield
    finally:
        _writes_in_progress -= 1
    if not _writes_in_progress and _received is not None:
        raise _received()
