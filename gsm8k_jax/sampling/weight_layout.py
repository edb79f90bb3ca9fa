"""The attention weights in the order XLA:CPU's matmuls read them.

XLA:CPU's matmul kernels read each operand in one physical order. For the
attention einsums' weights (stored in Tunix's layout) that is not the order
they are stored in, so each program copies every one of them into it: each
prefill call, and inside the decode loop at every step, for every tile (54
copies per step at gemma3-270m shapes in float32; at hf-small shapes the
copies took about a tenth of a prefill call's time, docs/PERFORMANCE.md).

`arrange` makes those copies once per `Sampler` call, as a program of its
own, and `view` gives the programs the weights in their stored shapes
again: XLA then lays out the views' transposes as free reinterpretations of
the arranged arrays and reads them in place. The matmuls see the same
numbers in the same order as before, so every result is the same to the
bit. The price is one copy of the attention weights, held while the call
runs (118 MB at gemma3-270m in float32; it grows with the model). Only
float32 weights are arranged: bfloat16 ones are not copied inside the loop
(XLA hoists their converted re-layout out of it).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The platforms whose programs copy the weights (XLA:CPU's; the GPU's
# and TPU's are unmeasured).
PLATFORMS = ("cpu",)
# The order XLA:CPU reads each einsum weight in, as a permutation of its
# stored axes (found in the compiled programs' copies; prefill's and the
# decode loop's are the same).
CPU_READ_ORDERS = {
    "q_einsum": (1, 0, 2),  # [N, D, H] is read as [D, N, H]
    "kv_einsum": (2, 0, 1, 3),  # [C, K, D, H] is read as [D, C, K, H]
    "attn_vec_einsum": (1, 0, 2),  # [N, H, D] is read as [H, N, D]
}


def _read_order(path, weight: jax.Array) -> tuple[int, ...] | None:
    """The read order of the weight at a state path, or None to leave it."""
    if weight.dtype != jnp.float32:
        return None
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    for module, leaf in itertools.pairwise(names):
        if leaf == "w" and module in CPU_READ_ORDERS:
            return CPU_READ_ORDERS[module]
    return None


def _replace_ordered(fn, tree: nnx.State) -> nnx.State:
    """`tree` with its weights that have a read order replaced by
    `fn(weights, orders)` (tuples, in tree order); `tree` itself when no
    weight has one (e.g. in bfloat16)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    orders = {
        i: order
        for i, (path, x) in enumerate(flat)
        if (order := _read_order(path, x)) is not None
    }
    if not orders:
        return tree
    leaves = [x for _, x in flat]
    moved = fn(tuple(leaves[i] for i in orders), tuple(orders.values()))
    for i, x in zip(orders, moved, strict=True):
        leaves[i] = x
    return jax.tree_util.tree_unflatten(treedef, leaves)


def arrange(params: nnx.State) -> nnx.State:
    """`params` with each attention weight copied into its read order, by
    one program; every other leaf is the same array (and `params` itself is
    returned when no weight has a read order, e.g. in bfloat16)."""
    return _replace_ordered(_transposed, params)


@functools.partial(jax.jit, static_argnums=1)
def _transposed(
    weights: tuple[jax.Array, ...], orders: tuple[tuple[int, ...], ...]
) -> tuple[jax.Array, ...]:
    return tuple(jnp.transpose(x, o) for x, o in zip(weights, orders, strict=True))


def view(arranged: nnx.State) -> nnx.State:
    """The weights of `arrange(params)` in their stored shapes again."""
    back = lambda weights, orders: tuple(
        jnp.transpose(x, np.argsort(o)) for x, o in zip(weights, orders, strict=True)
    )
    return _replace_ordered(back, arranged)


def arranges(platform: str | None = None) -> bool:
    """Whether the sampler's programs on `platform` (default: the default
    backend) run on arranged weights."""
    return (platform or jax.default_backend()) in PLATFORMS
