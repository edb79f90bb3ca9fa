"""Tunix-layout LoRA checkpoints written with plain Orbax, for tests.

Independent of gsm8k_jax's own save function: shapes are written out by hand
from qwix's LoRA layout (`<param>_lora_a` takes the weight's contracting
dims and the rank, `<param>_lora_b` the rank and the rest) and the tree is
nested as Tunix's nnx.State saves it.
"""

import numpy as np
import orbax.checkpoint as ocp


def factor_shapes(hf_config, rank):
    """LoRA factor shapes per module, written out by hand (qwix's layout)."""
    d, f = hf_config.hidden_size, hf_config.intermediate_size
    n, k, h = (
        hf_config.num_attention_heads,
        hf_config.num_key_value_heads,
        hf_config.head_dim,
    )
    return {
        "attn/q_einsum/w": ((d, rank), (rank, n, h)),
        "attn/kv_einsum/w": ((d, rank), (rank, 2, k, h)),
        "attn/attn_vec_einsum/w": ((n, h, rank), (rank, d)),
        "mlp/gate_proj/kernel": ((d, rank), (rank, f)),
        "mlp/up_proj/kernel": ((d, rank), (rank, f)),
        "mlp/down_proj/kernel": ((f, rank), (rank, d)),
    }


def random_factors(hf_config, rank, seed=0):
    """{(layer, 'attn/q_einsum/w'): (a, b)} with non-zero a and b."""
    rng = np.random.default_rng(seed)
    return {
        (i, name): tuple(
            (rng.standard_normal(shape) * 0.2).astype(np.float32) for shape in shapes
        )
        for i in range(hf_config.num_hidden_layers)
        for name, shapes in factor_shapes(hf_config, rank).items()
    }


def write_tunix_checkpoint(directory, factors, *, value_key=True, int_layers=False):
    """Saves factors with plain Orbax, nested as Tunix's nnx.State saves them."""
    tree = {"layers": {}}
    for (i, name), pair in factors.items():
        node = tree["layers"].setdefault(i if int_layers else str(i), {})
        *modules, param = name.split("/")
        for module in modules:
            node = node.setdefault(module, {})
        for suffix, array in zip("ab", pair):
            node[f"{param}_lora_{suffix}"] = {"value": array} if value_key else array
    ocp.PyTreeCheckpointer().save(directory, tree)
