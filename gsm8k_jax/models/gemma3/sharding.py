"""Placing Gemma 3 and its decode state on a device mesh.

Two mesh axes: `data` splits the batch (slots) across devices, `model`
splits heads and the MLP hidden dimension (Megatron-style tensor
parallelism) so 12b/27b fit. A dimension is split only when the axis size
divides it; otherwise it is replicated. XLA's sharding propagation does
the rest inside the jitted programs.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gsm8k_jax.models.gemma3.modules import LoraFactor

DATA, MODEL = "data", "model"

# Which dimension of each weight is split over the `model` axis.
_MODEL_AXIS_OF_PARAM = {
    "q_einsum": 0,  # [N, D, H]: heads
    "kv_einsum": 1,  # [2, K, D, H]: kv heads
    "attn_vec_einsum": 0,  # [N, H, D]: heads
    "gate_proj": 1,  # [D, F]
    "up_proj": 1,  # [D, F]
    "down_proj": 0,  # [F, D]
    "embedder": 0,  # [V, D]: vocabulary
}


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh; data=-1 uses every device not used by `model`."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    if data == -1:
        data = devices.size // model
    if data * model != devices.size:
        raise ValueError(
            f"Mesh data={data} x model={model} needs {data * model} devices;"
            f" {devices.size} are available."
        )
    return Mesh(devices.reshape(data, model), (DATA, MODEL))


def check_mesh(mesh: Mesh) -> None:
    """Refuses a mesh the programs cannot run on: its axes must be (data,
    model), of automatic type (the programs leave placements inside them
    to XLA)."""
    fix = "make it with gsm8k_jax.models.gemma3.sharding.make_mesh(data, model)."
    if tuple(mesh.axis_names) != (DATA, MODEL):
        raise ValueError(
            f"The mesh's axes are {tuple(mesh.axis_names)}; the sampler needs"
            f" ({DATA!r}, {MODEL!r}): {fix}"
        )
    if any(axis_type != AxisType.Auto for axis_type in mesh.axis_types):
        raise ValueError(
            f"The mesh's axes are of type {mesh.axis_types} (jax.make_mesh's"
            f" default is Explicit); the sampler needs automatic axes: {fix}"
        )


def _split(
    shape: tuple[int, ...], axis: int | None, name: str, mesh: Mesh
) -> PartitionSpec:
    spec = [None] * len(shape)
    if axis is not None and shape[axis] % mesh.shape[name] == 0:
        spec[axis] = name
    return PartitionSpec(*spec)


def param_sharding(
    path: tuple[str | int, ...], shape: tuple[int, ...], mesh: Mesh
) -> NamedSharding:
    """Where the parameter at `path` (`('layers', 0, 'mlp', 'gate_proj',
    'kernel')`) of this shape lives on `mesh`: the table's axis split over
    `model` when it divides, replicated otherwise."""
    axis = next((a for key, a in _MODEL_AXIS_OF_PARAM.items() if key in path), None)
    return NamedSharding(mesh, _split(shape, axis, MODEL, mesh))


def check_model_parallelism(num_heads: int, model_parallel: int) -> None:
    """Tensor parallelism splits query heads: `model_parallel` must divide them.

    (KV heads, MLP hidden and vocabulary are replicated where it does not
    divide them: 1b has one KV head.)
    """
    if model_parallel < 1 or num_heads % model_parallel:
        divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"--mesh_model={model_parallel} does not divide the model's {num_heads}"
            f" query heads: use one of {divisors}."
        )


def shard_model(model: nnx.Module, mesh: Mesh) -> None:
    """Moves the model's weights onto `mesh` (in place); weights already
    there (`load_hf_model(..., mesh=mesh)`) stay where they are. Attached
    LoRA factors already on the mesh stay too (`attach_lora` places them
    beside their weights' blocks); others are replicated (they are small)."""
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    for path, variable in flat.items():
        value = variable.get_value()
        if isinstance(variable, LoraFactor):
            placed = getattr(value, "sharding", None)
            if isinstance(placed, NamedSharding) and placed.mesh == mesh:
                continue
            sharding = NamedSharding(mesh, PartitionSpec())
        else:
            sharding = param_sharding(path, value.shape, mesh)
        flat[path] = variable.replace(jax.device_put(value, sharding))
    nnx.update(model, nnx.from_flat_state(flat))


def decode_state_sharding(x: jax.Array, mesh: Mesh) -> NamedSharding:
    """Where an array of a DecodeState lives: split over `data` by slot (and
    a [B, S, K, H] cache's kv heads over `model`); scalars replicated."""
    spec = list(_split(x.shape, 0, DATA, mesh)) if x.ndim else []
    if x.ndim == 4:  # [B, S, K, H] cache: kv heads on the model axis.
        spec[2] = _split(x.shape, 2, MODEL, mesh)[2]
    return NamedSharding(mesh, PartitionSpec(*spec))


def constrain_decode_state(state, mesh: Mesh | None):
    """Inside a program: its DecodeState placed by `decode_state_sharding`
    (as it is without a mesh).

    The programs that make or return a DecodeState end with it, so the
    state is made where it lives (not whole on one device, then moved) and
    every program returns the placement the next is compiled for.
    """
    if mesh is None:
        return state
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, decode_state_sharding(x, mesh)),
        state,
    )
