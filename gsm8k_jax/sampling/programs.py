"""Jitted programs compiled ahead of time, one executable per argument shape.

`jax.jit` compiles on the first call with a new shape, which means running
the program once: warming the sampler up that way cost a prefill group per
prompt bucket even when the persistent compilation cache already held every
executable. A `Program` lowers and compiles without running
(`jit(...).lower(...).compile()`), keeps each executable under the shapes
and dtypes of its arguments, and runs the kept one on later calls.
`compile_all` compiles several at once: lowering is Python, but XLA
compiles without holding the GIL, so the programs compile in parallel.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax


def _leaf_signature(leaf: Any) -> Hashable:
    shape = getattr(leaf, "shape", None)  # a jax or numpy array or scalar
    if shape is not None:
        return (shape, leaf.dtype, getattr(leaf, "weak_type", False))
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


def compile_all(calls: Sequence[tuple[Program, tuple, dict[str, Hashable]]]) -> None:
    """Compiles `program(*args, **static)` for each call not compiled yet:
    lowered one after another, compiled in parallel threads."""
    pending: dict[tuple[int, Hashable], tuple[Program, jax.stages.Lowered]] = {}
    for program, args, static in calls:
        key = signature(args, static)
        if key not in program._executables and (id(program), key) not in pending:
            pending[id(program), key] = (program, program._jitted.lower(*args, **static))
    if not pending:
        return
    with concurrent.futures.ThreadPoolExecutor(len(pending)) as pool:
        compiled = list(pool.map(lambda p: p[1].compile(), pending.values()))
    for ((_, key), (program, _)), executable in zip(pending.items(), compiled):
        program._executables[key] = executable
