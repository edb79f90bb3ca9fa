"""A Gemma 3 `config.json` read the way transformers reads it, without
transformers' config classes.

Those classes import torch whenever it is installed (about 2 s of every
start on CPU, and its memory in every notebook), for no use here. The
rules below are `transformers.Gemma3TextConfig`'s (transformers 5): the
defaults a config leaves out, the older fields (`rope_theta`,
`rope_local_base_freq`, `rope_scaling`, `sliding_window_pattern`) and the
multimodal wrapper (`text_config`). `tests/models/test_hf_config.py` checks
them against transformers itself on the released configs' formats.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Gemma3TextConfig's defaults: a multimodal config's `text_config` (4b, 12b,
# 27b) leaves out whatever equals them.
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "max_position_embeddings": 131_072,
    "layer_types": None,
    "rope_parameters": None,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "use_bidirectional_attention": False,
}
# Fields the model is built from, which must be numbers (transformers' own
# config classes refuse other types too).
NUMERIC_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "query_pre_attn_scalar",
    "sliding_window",
    "max_position_embeddings",
)
DEFAULT_SLIDING_WINDOW_PATTERN = 6
DEFAULT_ROPE_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
# Older configs' RoPE bases, before `rope_parameters`.
LEGACY_ROPE_THETA = {
    "full_attention": "rope_theta",
    "sliding_attention": "rope_local_base_freq",
}
TEXT_MODEL_TYPE, MULTIMODAL_MODEL_TYPE = "gemma3_text", "gemma3"


def text_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The text model's fields of a Gemma 3 config.json (text-only or
    multimodal), every default filled in, `layer_types` spelled out and
    `rope_parameters` given per layer type."""
    model_type = raw.get("model_type")
    if model_type == MULTIMODAL_MODEL_TYPE:
        text = raw.get("text_config") or {}
    elif model_type == TEXT_MODEL_TYPE:
        text = raw
    else:
        raise ValueError(
            f"Expected a Gemma 3 config (model_type '{TEXT_MODEL_TYPE}' or"
            f" '{MULTIMODAL_MODEL_TYPE}'), got model_type={model_type!r}."
            " gsm8k_jax implements Gemma 3 only."
        )
    fields = {key: text.get(key, default) for key, default in TEXT_DEFAULTS.items()}
    for name in NUMERIC_FIELDS:
        _require_number(name, fields[name])
    if fields["layer_types"] is None:
        pattern = text.get("sliding_window_pattern", DEFAULT_SLIDING_WINDOW_PATTERN)
        fields["layer_types"] = [
            "sliding_attention" if (i + 1) % pattern else "full_attention"
            for i in range(fields["num_hidden_layers"])
        ]
    fields["rope_parameters"] = _rope_parameters(text)
    return fields


def _rope_parameters(text: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{layer type: RoPE parameters}, from `rope_parameters` or the older
    fields; an older `rope_scaling` applies to global layers."""
    given = text.get("rope_parameters") or {}
    rope = {
        layer_type: dict(given.get(layer_type) or {"rope_type": "default"})
        for layer_type in DEFAULT_ROPE_THETA
    }
    if text.get("rope_scaling") is not None:
        rope["full_attention"].update(text["rope_scaling"])
    for layer_type, default in DEFAULT_ROPE_THETA.items():
        params = rope[layer_type]
        params.setdefault(
            "rope_theta", text.get(LEGACY_ROPE_THETA[layer_type], default)
        )
        params.setdefault("rope_type", params.get("type", "default"))
        _require_number(f"rope_theta of {layer_type} layers", params["rope_theta"])
    return rope


def _require_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"its {name} is {value!r}, not a number.")
