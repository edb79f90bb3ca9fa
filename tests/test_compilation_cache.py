"""A run's summary counts the programs it read from and wrote to JAX's
persistent compilation cache, however the cache was turned on."""

import os

from fresh_interpreter import last_value

COUNT_ONE_PROGRAM = """
import jax, jax.numpy as jnp
from gsm8k_jax.compilation_cache import cache_counts
before = cache_counts()
jax.jit(lambda x: x * 2 + 1)(jnp.ones(3))
after = cache_counts()
print({k: after[k] - before[k] for k in after})
"""


def test_a_cache_turned_on_through_jax_itself_is_counted(tmp_path):
    """`JAX_COMPILATION_CACHE_DIR` (no `enable_compilation_cache`): the first
    process writes its programs, the second reads them all."""
    env = os.environ | {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }

    first = last_value(COUNT_ONE_PROGRAM, env)  # With what jnp.ones compiles.
    assert first["read"] == 0 and first["written"] >= 1
    assert last_value(COUNT_ONE_PROGRAM, env) == {
        "read": first["written"],
        "written": 0,
    }
