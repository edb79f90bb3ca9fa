"""Loading Hugging Face Gemma 3 checkpoints into the NNX model.

Weights are read one tensor at a time from (possibly sharded) safetensors,
converted to the target layout and dtype, and placed on device before the
next is read, so even a 27b never needs two full copies in host memory. The
model itself is created abstractly (`nnx.eval_shape`): no random init.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx
from safetensors import safe_open

from gsm8k_jax.models.gemma3.config import Gemma3Config
from gsm8k_jax.models.gemma3.model import Gemma3

_EMBED_SUFFIX = "embed_tokens.weight"


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not fit the model."""


def load_config(model_dir: str | os.PathLike) -> Gemma3Config:
    """Reads `config.json` (text-only or multimodal Gemma 3) into a Gemma3Config."""
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"No config.json in {model_dir}: expected a Hugging Face model folder"
            " (config.json plus *.safetensors)."
        )
    hf_config = transformers.AutoConfig.from_pretrained(model_dir)
    return Gemma3Config.from_hf(hf_config)


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
                with safe_open(shard, framework="numpy") as f:
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

    def get(self, name: str) -> np.ndarray:
        full = self.prefix + name
        if full not in self._files:
            raise CheckpointError(f"Missing tensor '{full}' in {self.model_dir}.")
        with safe_open(self._files[full], framework="numpy") as f:
            return f.get_tensor(full)


def _hf_tensors(config: Gemma3Config) -> Iterator[tuple[tuple, list[str], Callable]]:
    """Yields (our param path, HF tensor names, HF arrays -> our layout)."""
    n, k, d, h = (
        config.num_heads,
        config.num_kv_heads,
        config.embed_dim,
        config.head_dim,
    )
    same = lambda w: w
    yield ("embedder", "input_embedding"), ["embed_tokens.weight"], same
    yield ("final_norm", "scale"), ["norm.weight"], same
    norms = {
        "pre_attention_norm": "input_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "pre_ffw_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    }
    for i in range(config.num_layers):
        hf = f"layers.{i}."
        for ours, theirs in norms.items():
            yield ("layers", i, ours, "scale"), [hf + theirs + ".weight"], same
        yield (
            ("layers", i, "attn", "q_einsum", "w"),
            [hf + "self_attn.q_proj.weight"],  # (N*H, D) -> [N, D, H]
            lambda w: w.reshape(n, h, d).transpose(0, 2, 1),
        )
        yield (
            ("layers", i, "attn", "kv_einsum", "w"),
            [hf + "self_attn.k_proj.weight", hf + "self_attn.v_proj.weight"],
            lambda wk, wv: np.stack([wk, wv]).reshape(2, k, h, d).transpose(0, 1, 3, 2),
        )
        yield (
            ("layers", i, "attn", "attn_vec_einsum", "w"),
            [hf + "self_attn.o_proj.weight"],  # (D, N*H) -> [N, H, D]
            lambda w: w.T.reshape(n, h, d),
        )
        yield (
            ("layers", i, "attn", "_query_norm", "scale"),
            [hf + "self_attn.q_norm.weight"],
            same,
        )
        yield (
            ("layers", i, "attn", "_key_norm", "scale"),
            [hf + "self_attn.k_norm.weight"],
            same,
        )
        for proj in ("gate_proj", "up_proj", "down_proj"):  # (out, in) -> [in, out]
            yield (
                ("layers", i, "mlp", proj, "kernel"),
                [hf + f"mlp.{proj}.weight"],
                np.transpose,
            )


def load_hf_model(
    model_dir: str | os.PathLike,
    *,
    dtype: jnp.dtype = jnp.bfloat16,
    param_dtype: jnp.dtype | None = None,
    config: Gemma3Config | None = None,
) -> Gemma3:
    """Builds a Gemma3 from a local Hugging Face folder.

    Args:
      model_dir: folder with config.json and single or sharded safetensors.
      dtype: activation dtype. param_dtype: storage dtype (default: dtype).
      config: overrides the config read from config.json.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"Model folder {model_dir} does not exist.")
    config = config or load_config(model_dir)
    param_dtype = param_dtype or dtype
    reader = _SafetensorsReader(model_dir)

    model = nnx.eval_shape(
        lambda: Gemma3(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    graphdef, abstract_state = nnx.split(model)
    flat = dict(nnx.to_flat_state(abstract_state))
    for path, names, convert in _hf_tensors(config):
        expected = flat[path]
        value = convert(*(reader.get(name) for name in names))
        if value.shape != expected.get_value().shape:
            raise CheckpointError(
                f"Tensor(s) {', '.join(reader.prefix + n for n in names)} in {model_dir}"
                f" give shape {value.shape} for {'/'.join(map(str, path))}, expected"
                f" {expected.get_value().shape} from config.json."
            )
        flat[path] = expected.replace(jax.device_put(value.astype(param_dtype)))
    unfilled = [
        p for p, v in flat.items() if isinstance(v.get_value(), jax.ShapeDtypeStruct)
    ]
    if unfilled:
        raise CheckpointError(f"No weights were loaded for {unfilled}.")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
