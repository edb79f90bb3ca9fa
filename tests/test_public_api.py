"""`import gsm8k_jax` is all a notebook needs."""

import subprocess
import sys

import gsm8k_jax


def test_every_public_name_resolves():
    for name in gsm8k_jax.__all__:
        value = getattr(gsm8k_jax, name)
        assert getattr(value, "__name__", name) == name or not callable(value), name


def test_reading_and_comparing_runs_imports_no_jax():
    """Comparing results on a laptop needs no jax or flax."""
    code = (
        "import sys, gsm8k_jax; gsm8k_jax.load_runs; gsm8k_jax.compare_runs;"
        " gsm8k_jax.LoraConfig; print(sorted(m for m in ('jax', 'flax') if m in"
        " sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
