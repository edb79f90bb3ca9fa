"""The benchmarks' models, with random weights: small configs beside the
named sizes, our model and transformers' reference holding the same numbers,
and their inputs (token-id prompts for ours, left-padded ones for the
reference). Benchmark-only: the library never imports it."""

from __future__ import annotations

import dataclasses
import gc
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gsm8k_jax.models.gemma3.config import CONFIGS, Gemma3Config
from gsm8k_jax.models.gemma3.model import Gemma3
from gsm8k_jax.models.gemma3.params import BOS_ID, PAD_ID, hf_config, load_hf_model

# A small random HF config, bigger than the parity-test ones (tests/hf_models.py)
# so that per-step work is not pure overhead; 7 layers so both attention types
# occur, and a window shorter than prompt + generation.
HF_TINY = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 7,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "sliding_window": 64,
    "query_pre_attn_scalar": 64,
}

# Twice hf-tiny's width, with grouped-query attention (the eval-CLI benchmark).
HF_SMALL = HF_TINY | {
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def hf_text_config(model: str | dict[str, Any]):
    """The `transformers.Gemma3TextConfig` of a benchmark model.

    No eos id: the reference must generate the full budget, like ours.
    """
    import transformers

    if isinstance(model, str) and model in CONFIGS:
        return hf_config(
            CONFIGS[model](), max_position_embeddings=8192, eos_token_id=None
        )
    kwargs = dict(model) if isinstance(model, dict) else dict(HF_TINY)
    kwargs = (
        {
            "max_position_embeddings": 8192,
            "pad_token_id": PAD_ID,
            "bos_token_id": BOS_ID,
        }
        | kwargs
        | {"eos_token_id": None}
    )
    return transformers.Gemma3TextConfig(**kwargs)


def make_random_hf_model(text_config, path: str | os.PathLike, seed: int = 0) -> None:
    """Saves a random `Gemma3ForCausalLM` (float32) to `path`.

    Same recipe as tests/hf_models.py: non-zero norm scales, small embeddings
    and O(1) matrices, so greedy text depends on attention and is not one
    token repeated.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(text_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if "norm" in name else 0.1 if "embed" in name else 0.5
            p.copy_(torch.randn_like(p) * scale)
    model.float().eval().save_pretrained(path)
    del model
    gc.collect()


def build_model(
    model: str | dict[str, Any],
    dtype: jnp.dtype,
    seed: int,
    model_dir: str | os.PathLike,
    *,
    with_reference: bool,
) -> Gemma3:
    """Our model of a benchmark config, with random weights.

    with_reference: build the weights as a transformers model saved to
    `model_dir` (for the reference side) and read them back with our loader,
    so both sides hold identical numbers; else initialise ours directly (no
    torch allocation at all, for big configs).
    """
    if with_reference:
        make_random_hf_model(hf_text_config(model), model_dir, seed=seed)
        return load_hf_model(model_dir, dtype=dtype)
    if isinstance(model, str) and model in CONFIGS:
        config = CONFIGS[model]()
    else:
        config = Gemma3Config.from_hf(hf_text_config(model))
    return Gemma3(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))


def left_pad(
    prompts: Sequence[Sequence[int]], width: int
) -> tuple[np.ndarray, np.ndarray]:
    """[B, width] int64 ids and attention mask, prompts right-aligned."""
    ids = np.full((len(prompts), width), PAD_ID, np.int64)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    return ids, mask


@dataclasses.dataclass
class IdTokenizer:
    """Prompts are token ids already; the sampler only needs pad/bos and decode."""

    pad_token_id: int = PAD_ID
    bos_token_id: int = BOS_ID

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


def reference_device() -> str:
    """Where the reference runs: the GPU when ours runs on one (and torch
    sees it), else the CPU, so that a ratio compares like with like."""
    import torch

    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    return "cuda" if on_gpu else "cpu"


def load_reference(model_dir: str | os.PathLike, dtype: str):
    """transformers' `Gemma3ForCausalLM` from `model_dir` in `dtype` (a key of
    DTYPES), in eval mode on `reference_device()`, with torch using every core."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = transformers.Gemma3ForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    return model.to(reference_device()).eval()
