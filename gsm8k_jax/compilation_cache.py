"""JAX's persistent compilation cache, so a rerun skips compiling.

A run's programs have shapes fixed by its settings (batch, prompt buckets,
cache length), so the next run of the same settings, or a resumed one,
finds every program already compiled on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from gsm8k_jax.checkpoints.sources import cache_dir

# Programs that compile faster than this are not worth a disk entry.
MIN_COMPILE_TIME_S = 0.5


def default_compilation_cache_dir() -> Path:
    """Under the package's cache folder ($GSM8K_JAX_CACHE, else ~/.cache/gsm8k_jax)."""
    return cache_dir() / "jax_compilation_cache"


def enable_compilation_cache(path: str | os.PathLike) -> None:
    """Stores compiled programs in `path` and reuses them ("" turns it off)."""
    if not os.fspath(path):
        return
    jax.config.update("jax_compilation_cache_dir", os.fspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
