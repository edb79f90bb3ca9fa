"""JAX's persistent compilation cache, so a rerun skips compiling.

A run's programs have shapes fixed by its settings (batch, prefill chunk,
cache length), so the next run of the same settings, or a resumed one,
finds every program already compiled on disk.
"""

from __future__ import annotations

import collections
import functools
import os
import threading
from pathlib import Path

from gsm8k_jax.checkpoints.sources import cache_dir

# Programs that compile faster than this are not worth a disk entry. Small
# ones are: on CPU the empty decode state and the arranged weights compile
# in 0.10 and 0.05 s each run, and load from the cache in 5 ms.
MIN_COMPILE_TIME_S = 0.03
# JAX's own setting of the threshold, which wins over MIN_COMPILE_TIME_S.
MIN_COMPILE_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
# JAX's monitoring events for a program read from the cache and one written
# to it (JAX names a write a miss: programs not worth an entry are neither).
_CACHE_EVENTS = {
    "/jax/compilation_cache/cache_hits": "read",
    "/jax/compilation_cache/cache_misses": "written",
}
# Over the whole process: programs compile in worker threads.
_counts: collections.Counter[str] = collections.Counter()
_counts_lock = threading.Lock()


def _count(event: str, **_) -> None:
    if event in _CACHE_EVENTS:
        with _counts_lock:
            _counts[_CACHE_EVENTS[event]] += 1


@functools.cache
def _listen() -> None:
    """Counts cache events from now on (once per process)."""
    import jax

    jax.monitoring.register_event_listener(_count)


def cache_counts() -> dict[str, int]:
    """Programs this process has read from and written to the persistent
    cache since it first asked (here or in `enable_compilation_cache`),
    however the cache was turned on; a sweep evaluating on device groups
    side by side counts all groups'. A rerun of the same settings reads
    what the first run wrote, and writes nothing."""
    _listen()
    with _counts_lock:
        return {name: _counts[name] for name in _CACHE_EVENTS.values()}


def default_compilation_cache_dir() -> Path:
    """Under the package's cache folder ($GSM8K_JAX_CACHE, else ~/.cache/gsm8k_jax)."""
    return cache_dir() / "jax_compilation_cache"


def enable_compilation_cache(path: str | os.PathLike) -> None:
    """Stores compiled programs in `path` and reuses them ("" turns it off);
    those compiling in under MIN_COMPILE_TIME_S are not stored, unless
    JAX's own environment variable sets another threshold. Imports jax
    here, not at the module's import: flag parsing reads the default
    folder before any heavy import."""
    import jax

    _listen()
    if not os.fspath(path):
        return
    jax.config.update("jax_compilation_cache_dir", os.fspath(path))
    if MIN_COMPILE_TIME_ENV not in os.environ:
        jax.config.update(
            "jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S
        )
