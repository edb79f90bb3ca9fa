"""Orbax restores that fail in one error, without stray tracebacks after it.

Orbax reads every array of a restore concurrently, on an event loop it
closes as soon as the restore returns or raises. When one array cannot be
read (a damaged checkpoint), the reads of the others are still in flight,
and as each finishes, tensorstore calls back into the closed loop from its
own thread: "RuntimeError: Event loop is closed" tracebacks after the
error, then "Future exception was never retrieved" as their futures are
collected. Orbax offers no way to wait for them, so while a restore here
runs, Orbax's loop runner (a private function) is wrapped: the coroutine it
runs awaits its loop's other tasks before it fails. Where a later Orbax has
no such function, nothing is wrapped (restores work as before, only
noisier on failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

# How long a failing restore waits for the reads still in flight.
DRAIN_TIMEOUT_S = 60.0
_RUNNER = "_run_sync_via_new_loop"

# Orbax's own runner while it is wrapped, and the restores using the wrap.
_original: Callable[..., Any] | None = None
_users = 0
_lock = threading.Lock()


async def drained(coro: Coroutine[Any, Any, Any]) -> Any:
    """Awaits `coro`; where it fails, first awaits the other tasks of its
    loop (for up to DRAIN_TIMEOUT_S), retrieving their errors (the one
    raised, or like it)."""
    try:
        return await coro
    except Exception:
        current = asyncio.current_task()
        if pending := [t for t in asyncio.all_tasks() if t is not current]:
            await asyncio.wait(pending, timeout=DRAIN_TIMEOUT_S)
            for task in pending:
                if task.done() and not task.cancelled():
                    task.exception()
        raise


def _draining_runner(coro: Coroutine[Any, Any, Any], *args: Any, **kwargs: Any) -> Any:
    """Orbax's runner, running `coro` drained."""
    return _original(drained(coro), *args, **kwargs)


@contextlib.contextmanager
def reads_finish_before_failing() -> Iterator[None]:
    """While it lasts, an Orbax restore that fails waits for its other reads."""
    global _original, _users
    try:
        from orbax.checkpoint._src import asyncio_utils
    except ImportError:
        asyncio_utils = None
    if getattr(asyncio_utils, _RUNNER, None) is None:
        yield
        return
    with _lock:
        if _users == 0:
            _original = getattr(asyncio_utils, _RUNNER)
            setattr(asyncio_utils, _RUNNER, _draining_runner)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                setattr(asyncio_utils, _RUNNER, _original)
                _original = None
