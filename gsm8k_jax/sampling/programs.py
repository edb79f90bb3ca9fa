"""Jitted programs compiled ahead of time, one executable per argument shape.

`jax.jit` compiles on the first call with a new shape, which means running
the program once: warming the sampler up that way cost a prefill group per
prompt bucket even when the persistent compilation cache already held every
executable. A `Program` lowers and compiles without running
(`jit(...).lower(...).compile()`), keeps each executable under the shapes
and dtypes of its arguments, and runs the kept one on later calls.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax
import numpy as np


def _leaf_signature(leaf: Any) -> Hashable:
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
        return (leaf.shape, str(leaf.dtype), bool(getattr(leaf, "weak_type", False)))
    return (type(leaf), leaf)  # a Python scalar: weakly typed by its type


def signature(args: tuple, static: dict[str, Hashable]) -> Hashable:
    """What selects an executable: the arguments' tree structure, every
    array's shape and dtype, and the static arguments. (A sampler places
    arrays by shape alone, so shardings follow from shapes.)"""
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple(map(_leaf_signature, leaves)), tuple(sorted(static.items()))


class Program:
    """A function jitted with `jit_kwargs`, compiled once per signature."""

    def __init__(self, fn: Callable, **jit_kwargs):
        self._jitted = jax.jit(fn, **jit_kwargs)
        self._executables: dict[Hashable, jax.stages.Compiled] = {}

    def compile(self, *args, **static) -> jax.stages.Compiled:
        """The executable for these arguments, compiled now if it is new
        (nothing runs; donated arguments stay alive)."""
        key = signature(args, static)
        if key not in self._executables:
            self._executables[key] = self._jitted.lower(*args, **static).compile()
        return self._executables[key]

    def __call__(self, *args, **static):
        return self.compile(*args, **static)(*args)

    @property
    def num_executables(self) -> int:
        return len(self._executables)
