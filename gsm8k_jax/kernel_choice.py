"""The same GPU kernels in every compilation of a program.

XLA's GPU autotuner times candidate kernels for each matmul fusion while it
compiles and keeps the fastest; timings fluctuate, so two compilations of
one program (two runs, at batch 1 and at batch 32, each compiling the same
fixed-shape programs) can pick different kernels, whose results differ in
the last bits (XLA's own notes on determinism say so). That would undo the
sampler's batch invariance across runs. With autotuning off, XLA picks each
kernel by rule, the same every time; the scripts turn it off before JAX
starts, unless `XLA_FLAGS` already sets a level (the user's choice, which
every run record names). CPU and TPU programs have no such autotuning.
"""

from __future__ import annotations

import os
import re

AUTOTUNE_FLAG = "--xla_gpu_autotune_level"
# XLA's default level, where XLA_FLAGS does not set one: autotuning on.
XLA_DEFAULT_AUTOTUNE_LEVEL = 4
# Kernels by rule, none timed.
FIXED_KERNELS_LEVEL = 0
_LEVEL = re.compile(rf"{AUTOTUNE_FLAG}=(\d+)")


def fix_gpu_kernels() -> None:
    """Turns XLA's GPU autotuning off in `XLA_FLAGS`, unless a level is set
    there. Takes effect only before JAX's backend starts (the first array,
    device query or compilation), so scripts call it first."""
    flags = os.environ.get("XLA_FLAGS", "")
    if AUTOTUNE_FLAG not in flags:
        os.environ["XLA_FLAGS"] = (
            f"{flags} {AUTOTUNE_FLAG}={FIXED_KERNELS_LEVEL}".strip()
        )


def gpu_autotune_level() -> int:
    """The autotune level `XLA_FLAGS` sets (XLA's default where it sets none)."""
    found = _LEVEL.findall(os.environ.get("XLA_FLAGS", ""))
    return int(found[-1]) if found else XLA_DEFAULT_AUTOTUNE_LEVEL


def recorded_autotune_level() -> int | None:
    """What a run records: the GPU autotune level on a GPU, else None (no
    other platform autotunes)."""
    import jax

    return gpu_autotune_level() if jax.default_backend() == "gpu" else None
