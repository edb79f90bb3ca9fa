"""Stopping on SIGTERM (a spot or preemptible VM's notice, ~30 s ahead).

`stop_on_sigterm()` makes SIGTERM raise `Terminated` in the main thread, as
Ctrl-C raises KeyboardInterrupt: the work stops where it is, sequences in
flight are dropped, and what finished is already committed. A commit in
progress is finished first: code inside `finishing_write()` is not
interrupted, the signal is raised when it ends.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class Terminated(BaseException):
    """The process received SIGTERM (a BaseException, like KeyboardInterrupt,
    so that no `except Exception` swallows it)."""


_writes_in_progress = 0
_pending = False


def _on_sigterm(signum, frame) -> None:
    global _pending
    if _writes_in_progress:
        _pending = True
        return
    raise Terminated()


def stop_on_sigterm() -> None:
    """Installs the SIGTERM handler (call from the main thread)."""
    signal.signal(signal.SIGTERM, _on_sigterm)


@contextlib.contextmanager
def finishing_write() -> Iterator[None]:
    """A block SIGTERM does not interrupt; a SIGTERM received inside raises
    `Terminated` once it has ended."""
    global _writes_in_progress, _pending
    _writes_in_progress += 1
    try:
        yield
    finally:
        _writes_in_progress -= 1
    if not _writes_in_progress and _pending:
        _pending = False
        raise Terminated()
