"""Loading the named models (`specs.py`): weights and tokenizer from one source.

`load_pretrained("gemma3-1b-it")` fetches google/gemma-3-1b-it from the hub;
`model_path` overrides the source with a local folder, a gs:// folder or
another hub id. `gemma3-tiny` ships inside the package, so it works offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import transformers
from jax.sharding import Mesh

from gsm8k_jax.checkpoints.sources import SourceError, resolve_model_dir
from gsm8k_jax.models.gemma3.config import CONFIGS, Gemma3Config
from gsm8k_jax.models.gemma3.model import Gemma3
from gsm8k_jax.models.gemma3.params import load_hf_model
from gsm8k_jax.models.specs import check_dtype, model_spec


def _shape(config: Gemma3Config) -> tuple[int, int]:
    return config.num_layers, config.embed_dim


def shape_warning(model_name: str, config: Gemma3Config, model_dir: Path) -> str | None:
    """A warning when the weights in `model_dir` (of `config`) do not have the
    shape of `model_name`'s size, else None: the name labels the run and
    decides its instruction-tuned defaults (chat template, task), so a wrong
    one mislabels the results silently."""
    size = model_name.removesuffix("-it").removesuffix("-pt")
    named = CONFIGS[size]()
    if _shape(named) == _shape(config):
        return None
    matching = [n for n, make in CONFIGS.items() if _shape(make()) == _shape(config)]
    theirs = f" (the shape of {' or '.join(matching)})" if matching else ""
    return (
        f"{model_dir} holds a {config.num_layers}-layer model of width"
        f" {config.embed_dim}{theirs}, not {model_name}'s {named.num_layers} layers"
        f" of width {named.embed_dim}: the model name labels the run and decides"
        " whether prompts use the chat template; pass the weights' own name."
    )


# A model folder's tokenizer: either file is enough for AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def load_pretrained(
    model_name: str,
    model_path: str | os.PathLike | None = None,
    *,
    dtype: str | jnp.dtype = "bfloat16",
    mesh: Mesh | None = None,
) -> tuple[Gemma3, transformers.PreTrainedTokenizerBase, Path]:
    """Loads a model and its tokenizer from the same source; with a mesh,
    each weight straight into its sharding (`load_hf_model`).

    Returns (model, tokenizer, local model folder).
    """
    spec = model_spec(model_name)
    model_dir = resolve_model_dir(model_path or spec.default_path)
    dtype = jnp.dtype(check_dtype(dtype)) if isinstance(dtype, str) else dtype
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        # transformers would fall back to a tokenizer of a few tokens.
        raise SourceError(
            f"{model_dir} holds no tokenizer ({' or '.join(TOKENIZER_FILES)}):"
            " copy the model's tokenizer files beside its weights."
        )
    model = load_hf_model(model_dir, dtype=dtype, mesh=mesh)
    return model, load_tokenizer(model_dir), model_dir


# The tokenizer classes a Gemma 3 folder's tokenizer_config.json names, and
# the transformers class AutoTokenizer loads for each.
_TOKENIZER_CLASSES = {
    "GemmaTokenizer": "GemmaTokenizer",
    "GemmaTokenizerFast": "GemmaTokenizer",
    "PreTrainedTokenizerFast": "TokenizersBackend",
    "TokenizersBackend": "TokenizersBackend",
}


def load_tokenizer(model_dir: Path) -> transformers.PreTrainedTokenizerBase:
    """The folder's tokenizer, as AutoTokenizer loads it. The classes a Gemma 3
    folder names are loaded directly: AutoTokenizer imports transformers'
    config classes, and with them torch wherever it is installed (about 2 s
    of every start). Any other class goes through AutoTokenizer."""
    try:
        declared = json.loads((model_dir / "tokenizer_config.json").read_text())
        name = _TOKENIZER_CLASSES.get(declared.get("tokenizer_class"))
    except (OSError, ValueError, AttributeError, TypeError):
        name = None
    if name is None:
        return transformers.AutoTokenizer.from_pretrained(model_dir)
    return getattr(transformers, name).from_pretrained(model_dir)


def default_eos_ids(model_dir: Path) -> tuple[int, ...]:
    """Stop ids from the checkpoint's generation_config.json (Gemma 3 it: 1, 106)."""
    try:
        config = transformers.GenerationConfig.from_pretrained(model_dir)
    except OSError:
        return (1, 106)
    eos = config.eos_token_id
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
