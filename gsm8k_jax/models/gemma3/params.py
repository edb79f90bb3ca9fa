"""Loading Hugging Face Gemma 3 checkpoints into the NNX model.

Weights are read one tensor at a time from (possibly sharded) safetensors,
converted to the target layout and dtype, and placed on device before the
next is read, so even a 27b never needs two full copies in host memory. The
model itself is created abstractly (`nnx.eval_shape`): no random init.
Given a mesh, each device reads only its own block of each tensor
(safetensors slices) into the `NamedSharding` of `sharding.param_sharding`:
no device ever holds a whole split weight.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from safetensors import SafetensorError, safe_open

from gsm8k_jax.models.gemma3.config import Gemma3Config
from gsm8k_jax.models.gemma3.model import Gemma3
from gsm8k_jax.models.gemma3.sharding import (
    MODEL,
    check_model_parallelism,
    param_sharding,
)

_EMBED_SUFFIX = "embed_tokens.weight"
# An output head of its own (a model whose config unties it from the input
# embeddings); Gemma 3's is tied, so one beside a tied config goes unread, as
# transformers leaves it.
_HEAD_SUFFIX = "lm_head.weight"
# Tensors read and converted at once while loading.
MAX_LOAD_THREADS = 8


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not fit the model."""


def load_config(model_dir: str | os.PathLike) -> Gemma3Config:
    """Reads `config.json` (text-only or multimodal Gemma 3) into a Gemma3Config."""
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        steps = sorted(
            int(d.name)
            for d in (model_dir.iterdir() if model_dir.is_dir() else ())
            if d.name.isdigit() and (d / "config.json").is_file()
        )
        hint = (
            f"; did you mean its latest step, {model_dir / str(steps[-1])}?"
            if steps
            else "."
        )
        raise CheckpointError(
            f"No config.json in {model_dir}: expected a Hugging Face model folder"
            f" (config.json plus *.safetensors){hint}"
        )
    try:
        raw = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{config_file} is not valid JSON ({e}): download it again."
        ) from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file} holds no JSON object: download it again.")
    try:
        return Gemma3Config.from_hf(raw)
    except KeyError as e:
        raise CheckpointError(f"{config_file} lacks the field {e}.") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: {e}") from e


def _unties_head(model_dir: Path) -> bool:
    """Whether config.json unties the output head from the input embeddings
    (at its top level, or a multimodal config's text_config)."""
    raw = json.loads((model_dir / "config.json").read_text())
    text = raw.get("text_config") or {}
    return False in (raw.get("tie_word_embeddings"), text.get("tie_word_embeddings"))


@contextlib.contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    """`safe_open`, with a damaged file (a truncated download) reported as a
    CheckpointError that names it."""
    try:
        opened = safe_open(path, framework="numpy")
    except SafetensorError as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}): download it again."
        ) from e
    with opened as f:
        yield f


class _SafetensorsReader:
    """Reads named tensors from single or sharded safetensors files."""

    def __init__(self, model_dir: Path):
        index_file = model_dir / "model.safetensors.index.json"
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            self._files = {name: model_dir / f for name, f in weight_map.items()}
        else:
            shards = sorted(model_dir.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"No *.safetensors files in {model_dir}.")
            self._files = {}
            for shard in shards:
                with _open_safetensors(shard) as f:
                    self._files.update({name: shard for name in f.keys()})
        embed = [n for n in self._files if n.endswith(_EMBED_SUFFIX)]
        if len(embed) != 1:
            raise CheckpointError(
                f"Expected one '*{_EMBED_SUFFIX}' tensor in {model_dir}, found"
                f" {embed or 'none'}: is this a Gemma 3 checkpoint?"
            )
        # '' for Gemma3ForCausalLM's 'model.*'; 'language_model.model.' or
        # 'model.language_model.' style prefixes for multimodal checkpoints.
        self.prefix = embed[0][: -len(_EMBED_SUFFIX)]
        self.model_dir = model_dir
        self.has_own_head = any(n.endswith(_HEAD_SUFFIX) for n in self._files)

    def _file(self, name: str) -> Path:
        full = self.prefix + name
        if full not in self._files:
            raise CheckpointError(f"Missing tensor '{full}' in {self.model_dir}.")
        return self._files[full]

    def get_block(self, name: str, index: Sequence[slice]) -> np.ndarray:
        """tensor[index], reading only that block from the file."""
        with _open_safetensors(self._file(name)) as f:
            return f.get_slice(self.prefix + name)[tuple(index)]

    def shape(self, name: str) -> tuple[int, ...]:
        with _open_safetensors(self._file(name)) as f:
            return tuple(f.get_slice(self.prefix + name).get_shape())


@dataclasses.dataclass(frozen=True)
class _TensorMapping:
    """One parameter of ours and the Hugging Face tensor(s) it comes from.

    `to_ours(*hf_arrays)` gives our layout; `to_hf(ours)` gives the HF
    arrays back, in `hf_names` order. Both directions live here so that
    loading and exporting can never disagree.

    `hf_axes[i]` is the axis of the HF tensor(s) that our axis i is read
    from as whole contiguous blocks (our q_einsum heads: rows of q_proj,
    head_dim rows each), None where it is not (head_dim inside those
    rows): a block of ours along such an axis is a slice of the file, and
    `to_ours` converts the slice as it converts the whole.
    """

    path: tuple[str | int, ...]
    hf_names: tuple[str, ...]
    to_ours: Callable[..., np.ndarray]
    to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    hf_axes: tuple[int | None, ...]


def _hf_tensors(config: Gemma3Config) -> Iterator[_TensorMapping]:
    """The layout table: every parameter, its HF names and both conversions."""
    n, k, d, h = (
        config.num_heads,
        config.num_kv_heads,
        config.embed_dim,
        config.head_dim,
    )

    def same(path: tuple[str | int, ...], name: str, ndim: int = 1) -> _TensorMapping:
        return _TensorMapping(
            path, (name,), lambda w: w, lambda w: (w,), tuple(range(ndim))
        )

    yield same(("embedder", "input_embedding"), "embed_tokens.weight", ndim=2)
    yield same(("final_norm", "scale"), "norm.weight")
    norms = {
        "pre_attention_norm": "input_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "pre_ffw_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    }
    for i in range(config.num_layers):
        hf = f"layers.{i}."
        for ours, theirs in norms.items():
            yield same(("layers", i, ours, "scale"), hf + theirs + ".weight")
        yield _TensorMapping(  # (N*H, D) <-> [N, D, H]
            ("layers", i, "attn", "q_einsum", "w"),
            (hf + "self_attn.q_proj.weight",),
            lambda w: w.reshape(-1, h, d).transpose(0, 2, 1),
            lambda w: (w.transpose(0, 2, 1).reshape(n * h, d),),
            (0, 1, None),
        )
        yield _TensorMapping(  # 2 x (K*H, D) <-> [2, K, D, H]
            ("layers", i, "attn", "kv_einsum", "w"),
            (hf + "self_attn.k_proj.weight", hf + "self_attn.v_proj.weight"),
            lambda wk, wv: (
                np.stack([wk, wv]).reshape(2, -1, h, d).transpose(0, 1, 3, 2)
            ),
            lambda w: tuple(w.transpose(0, 1, 3, 2).reshape(2, k * h, d)),
            (None, 0, 1, None),
        )
        yield _TensorMapping(  # (D, N*H) <-> [N, H, D]
            ("layers", i, "attn", "attn_vec_einsum", "w"),
            (hf + "self_attn.o_proj.weight",),
            lambda w: w.T.reshape(-1, h, d),
            lambda w: (w.reshape(n * h, d).T,),
            (1, None, 0),
        )
        for norm, theirs in (("_query_norm", "q_norm"), ("_key_norm", "k_norm")):
            yield same(
                ("layers", i, "attn", norm, "scale"), hf + f"self_attn.{theirs}.weight"
            )
        for proj in ("gate_proj", "up_proj", "down_proj"):  # (out, in) <-> [in, out]
            yield _TensorMapping(
                ("layers", i, "mlp", proj, "kernel"),
                (hf + f"mlp.{proj}.weight",),
                np.transpose,
                lambda w: (w.T,),
                (1, 0),
            )


def _shape_error(
    reader: _SafetensorsReader,
    mapping: _TensorMapping,
    got: tuple[int, ...],
    expected: tuple[int, ...],
) -> CheckpointError:
    names = ", ".join(reader.prefix + n for n in mapping.hf_names)
    return CheckpointError(
        f"Tensor(s) {names} in {reader.model_dir} give shape {got} for"
        f" {'/'.join(map(str, mapping.path))}, expected {expected} from config.json."
    )


def _read_block(
    reader: _SafetensorsReader,
    mapping: _TensorMapping,
    shape: tuple[int, ...],
    index: tuple[slice, ...],
    dtype: jnp.dtype,
) -> np.ndarray:
    """ours[index] (shape: the whole parameter's) in `dtype`, read from the
    file as slices of the HF tensor(s)."""
    hf_shapes = [reader.shape(name) for name in mapping.hf_names]
    hf_index = [[slice(None)] * len(s) for s in hf_shapes]
    for axis, block in enumerate(index):
        start, stop, _ = block.indices(shape[axis])
        if (start, stop) == (0, shape[axis]):
            continue
        hf_axis = mapping.hf_axes[axis]
        if hf_axis is None:  # A sharding-table entry the layout cannot slice.
            raise NotImplementedError(
                f"{'/'.join(map(str, mapping.path))} cannot be read in blocks"
                f" along axis {axis}."
            )
        for hf_shape, hf_block in zip(hf_shapes, hf_index, strict=True):
            unit, rest = divmod(hf_shape[hf_axis], shape[axis])  # HF rows per ours
            if rest:
                raise _shape_error(reader, mapping, tuple(hf_shape), shape)
            hf_block[hf_axis] = slice(start * unit, stop * unit)
    value = mapping.to_ours(
        *(
            reader.get_block(name, block)
            for name, block in zip(mapping.hf_names, hf_index, strict=True)
        )
    )
    expected = tuple(len(range(*b.indices(n))) for b, n in zip(index, shape))
    if value.shape != expected:
        raise _shape_error(reader, mapping, value.shape, expected)
    return value.astype(dtype, copy=False)


def _place_tensor(
    reader: _SafetensorsReader,
    mapping: _TensorMapping,
    shape: tuple[int, ...],
    dtype: jnp.dtype,
    sharding: NamedSharding | None,
) -> jax.Array:
    """One parameter on device: whole on the default device, or each device
    reading just its block of `sharding`."""
    if sharding is None:
        whole = (slice(None),) * len(shape)
        return jax.device_put(_read_block(reader, mapping, shape, whole, dtype))
    blocks: dict[tuple[tuple[int, int], ...], np.ndarray] = {}

    def block(index: tuple[slice, ...]) -> np.ndarray:
        # Devices that hold the same block (data replicas) read it once.
        key = tuple(b.indices(n)[:2] for b, n in zip(index, shape))
        if key not in blocks:
            blocks[key] = _read_block(reader, mapping, shape, index, dtype)
        return blocks[key]

    return jax.make_array_from_callback(shape, sharding, block)


def load_hf_model(
    model_dir: str | os.PathLike,
    *,
    dtype: jnp.dtype = jnp.bfloat16,
    param_dtype: jnp.dtype | None = None,
    config: Gemma3Config | None = None,
    mesh: Mesh | None = None,
) -> Gemma3:
    """Builds a Gemma3 from a local Hugging Face folder.

    Args:
      model_dir: folder with config.json and single or sharded safetensors.
      dtype: activation dtype. param_dtype: storage dtype (default: dtype).
      config: overrides the config read from config.json.
      mesh: place each weight straight into its sharding on this (data,
        model) mesh (`sharding.param_sharding`), each device reading its own
        block; None: every weight whole on the default device.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"Model folder {model_dir} does not exist.")
    config = config or load_config(model_dir)
    if mesh is not None:
        check_model_parallelism(config.num_heads, mesh.shape[MODEL])
    param_dtype = param_dtype or dtype
    reader = _SafetensorsReader(model_dir)
    if reader.has_own_head and _unties_head(model_dir):
        raise CheckpointError(
            f"{model_dir} has an output head of its own ({_HEAD_SUFFIX},"
            " tie_word_embeddings false): gsm8k_jax's Gemma 3 ties the head to"
            " the input embeddings, as every released Gemma 3 does; save the"
            " model with tied embeddings."
        )

    model = nnx.eval_shape(
        lambda: Gemma3(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    graphdef, abstract_state = nnx.split(model)
    flat = dict(nnx.to_flat_state(abstract_state))

    def place(mapping: _TensorMapping) -> jax.Array:
        shape = flat[mapping.path].get_value().shape
        sharding = param_sharding(mapping.path, shape, mesh) if mesh else None
        return _place_tensor(reader, mapping, shape, param_dtype, sharding)

    # Reading, converting and copying release the GIL: a few threads at once
    # (each holds up to two copies of one tensor in host memory).
    mappings = list(_hf_tensors(config))
    threads = min(os.cpu_count() or 1, MAX_LOAD_THREADS)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for mapping, value in zip(mappings, pool.map(place, mappings)):
            flat[mapping.path] = flat[mapping.path].replace(value)
    unfilled = [
        p for p, v in flat.items() if isinstance(v.get_value(), jax.ShapeDtypeStruct)
    ]
    if unfilled:
        raise CheckpointError(f"No weights were loaded for {unfilled}.")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# --------------------------------------------------------------------------
# Exporting: the inverse of loading, through the same table
# --------------------------------------------------------------------------

# Gemma 3's special token ids (every size, and the tiny tokenizer).
PAD_ID, EOS_ID, BOS_ID, END_OF_TURN_ID = 0, 1, 2, 106


def hf_config(config: Gemma3Config, **overrides) -> transformers.Gemma3TextConfig:
    """The transformers config that `Gemma3Config.from_hf` reads back as `config`;
    `overrides` go to `Gemma3TextConfig` as they are."""
    scalar = config.query_pre_attn_scalar
    global_rope = {"rope_type": "default", "rope_theta": config.global_rope_base}
    if config.global_rope_scale != 1.0:
        global_rope = {
            **global_rope,
            "rope_type": "linear",
            "factor": config.global_rope_scale,
        }
    kwargs = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.embed_dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "sliding_window": config.sliding_window,
        "layer_types": [t.value for t in config.layer_types],
        # HF declares an int (27b: 168); a fractional value stays as it is.
        "query_pre_attn_scalar": int(scalar) if scalar == int(scalar) else scalar,
        "rope_parameters": {
            "full_attention": global_rope,
            "sliding_attention": {
                "rope_type": "default",
                "rope_theta": config.local_rope_base,
            },
        },
        "rms_norm_eps": config.rms_norm_eps,
        "attn_logit_softcapping": config.attn_logit_softcap,
        "final_logit_softcapping": config.final_logit_softcap,
        "max_position_embeddings": config.max_position_embeddings,
        "pad_token_id": PAD_ID,
        "eos_token_id": [EOS_ID, END_OF_TURN_ID],
        "bos_token_id": BOS_ID,
        "torch_dtype": "bfloat16",
    }
    return transformers.Gemma3TextConfig(**(kwargs | overrides))


def export_hf_weights(
    model: Gemma3, *, dtype: jnp.dtype | None = None
) -> dict[str, np.ndarray]:
    """The model's weights as Gemma3ForCausalLM safetensors tensors (`model.*`).

    Args:
      model: a Gemma3 (a qwix LoRA model too: its base weights are exported,
        the LoRA factors are not; merge them first to include them).
      dtype: the tensors' dtype (default: each parameter's own).

    Returns:
      {'model.embed_tokens.weight': array, ...}, host numpy arrays that
      `load_hf_model` reads back into the same parameters.
    """
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    tensors = {}
    for mapping in _hf_tensors(model.config):
        value = np.asarray(flat[mapping.path].get_value())
        if dtype is not None:
            value = value.astype(dtype)
        for name, array in zip(mapping.hf_names, mapping.to_hf(value), strict=True):
            tensors["model." + name] = np.ascontiguousarray(array)
    return tensors


def save_hf_model(
    model: Gemma3,
    out_dir: str | os.PathLike,
    *,
    tokenizer: transformers.PreTrainedTokenizerBase | None = None,
    dtype: jnp.dtype | str = jnp.bfloat16,
) -> Path:
    """Writes a Hugging Face folder that `load_hf_model` (and transformers) loads.

    config.json, generation_config.json and model.safetensors (one file, in
    `dtype`), plus the tokenizer's files when one is given.
    """
    from safetensors.numpy import save_file  # Writing only.

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = jnp.dtype(dtype)
    config = hf_config(model.config, torch_dtype=dtype.name)
    config.to_json_file(out_dir / "config.json")
    transformers.GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=[EOS_ID, END_OF_TURN_ID], pad_token_id=PAD_ID
    ).save_pretrained(out_dir)
    save_file(export_hf_weights(model, dtype=dtype), out_dir / "model.safetensors")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
