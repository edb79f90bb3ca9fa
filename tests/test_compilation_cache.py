"""A run's summary counts the programs it read from and wrote to JAX's
persistent compilation cache, however the cache was turned on."""

import ast
import os
import subprocess
import sys

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

    def counts() -> dict[str, int]:
        done = subprocess.run(
            [sys.executable, "-c", COUNT_ONE_PROGRAM],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        return ast.literal_eval(done.stdout.strip().splitlines()[-1])

    first = counts()  # The program, and the small ones jnp.ones compiles.
    assert first["read"] == 0 and first["written"] >= 1
    assert counts() == {"read": first["written"], "written": 0}
