"""The named models and what they are, without loading anything: a name's
default source and whether it expects chat turns, and the dtypes a model
loads in. Flag parsing reads these (`eval/cli_flags.py`), so this module
imports neither jax nor transformers; `registry.py` loads the models.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

TINY_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "gemma3_tiny"
SUPPORTED_FAMILIES = ("Gemma3",)
DTYPES = ("bfloat16", "float32", "float16")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A named model: its default source and whether it expects chat turns."""

    name: str
    default_path: str
    instruction_tuned: bool


def _hub(size: str, kind: str) -> ModelSpec:
    return ModelSpec(
        f"gemma3-{size}-{kind}", f"google/gemma-3-{size}-{kind}", kind == "it"
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("gemma3-tiny", str(TINY_MODEL_DIR), instruction_tuned=True),
        *(
            _hub(size, kind)
            for size in ("270m", "1b", "4b", "12b", "27b")
            for kind in ("it", "pt")
        ),
    )
}


def model_spec(name: str) -> ModelSpec:
    """The spec of a named model; a ValueError lists the names."""
    if name not in MODELS:
        raise ValueError(
            f"Unknown model_name {name!r}; choose one of {sorted(MODELS)} (a"
            " folder or gs:// path goes in model_path, with the name of its size)."
        )
    return MODELS[name]


def check_dtype(name: str) -> str:
    """`name` if it is a dtype models load in, else a ValueError naming them."""
    if name not in DTYPES:
        raise ValueError(
            f"Unknown dtype {name!r}; use {', '.join(DTYPES[:-1])} or {DTYPES[-1]}."
        )
    return name
