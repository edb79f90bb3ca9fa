"""The attention weights in the order XLA:CPU's matmuls read them, for the
decode loop.

XLA:CPU's matmul kernels read each operand in one physical order. For the
attention einsums' weights (stored in Tunix's layout) that is not the order
they are stored in, so XLA copies each of them into it inside the decode
loop: at every step, for every tile (54 copies per step at gemma3-270m
shapes in float32; a profile gave them 49 ms of a 260 ms step on 2 CPU
cores, though removing them measured within noise, docs/PERFORMANCE.md).

`arrange` makes those copies once, before the loop, and `view` gives the
loop the weights in their stored shapes again: XLA then lays out the views'
transposes as free reinterpretations of the arranged arrays and reads them
in place. The matmuls see the same numbers in the same order as before, so
every result is the same to the bit. The price is one copy of the attention
weights per decode call, held while it runs (118 MB at gemma3-270m in
float32; it grows with the model). Only float32 weights are arranged:
bfloat16 ones are not copied inside the loop (XLA hoists their converted
re-layout out of it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The platforms whose decode loop copies the weights (XLA:CPU's; the GPU's
# and TPU's are unmeasured).
PLATFORMS = ("cpu",)
# The order XLA:CPU reads each einsum weight in, as a permutation of its
# stored axes (found in the compiled decode program's in-loop copies).
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
    for module, leaf in zip(names, names[1:]):
        if leaf == "w" and module in CPU_READ_ORDERS:
            return CPU_READ_ORDERS[module]
    return None


def _map_arranged(fn, tree: nnx.State) -> nnx.State:
    """`fn(weight, read_order)` for each weight of `tree` that has a read
    order; every other leaf as it is."""

    def apply(path, x):
        order = _read_order(path, x)
        return x if order is None else fn(x, order)

    return jax.tree_util.tree_map_with_path(apply, tree)


def arrange(params: nnx.State) -> nnx.State:
    """`params` with each attention weight copied into its read order.

    Each copy (and nothing else) sits behind an optimization barrier, so
    that XLA cannot fold it into the loop's transpose back to the stored
    order.
    """
    return _map_arranged(
        lambda x, order: jax.lax.optimization_barrier(jnp.transpose(x, order)), params
    )


def view(arranged: nnx.State) -> nnx.State:
    """The weights of `arrange(params)` in their stored shapes again."""
    return _map_arranged(lambda x, order: jnp.transpose(x, np.argsort(order)), arranged)


def arranges(platform: str | None = None) -> bool:
    """Whether the decode loop on `platform` (default: the default backend)
    runs on arranged weights."""
    return (platform or jax.default_backend()) in PLATFORMS
