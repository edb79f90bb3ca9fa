"""Gemma 3 text-model configurations: one frozen dataclass per published size.

Numbers follow the Gemma 3 technical report and the Hugging Face configs.
`Gemma3Config.from_hf` reads any Gemma 3 text checkpoint's `config.json`
(old and new formats, as transformers reads them: `hf_config.py`), so the
named sizes below are conveniences, not a closed list.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from gsm8k_jax.models.gemma3 import hf_config as hf_config_fields


class AttentionType(enum.Enum):
    """Which keys a layer's queries may see."""

    GLOBAL = "full_attention"  # Every earlier valid key.
    LOCAL_SLIDING = "sliding_attention"  # Earlier valid keys within the window.


# Gemma 3 repeats five sliding-window layers then one global layer.
SLIDING_WINDOW_PATTERN = 6
LOCAL_ROPE_BASE = 10_000.0
GLOBAL_ROPE_BASE = 1_000_000.0
GEMMA3_VOCAB_SIZE = 262_144
# Positions a model was trained for (`max_position_embeddings`): 32k for
# 270m and 1b, 128k (transformers' default) for 4b and up.
CONTEXT_32K, CONTEXT_128K = 32_768, 131_072


def gemma3_layer_types(num_layers: int) -> tuple[AttentionType, ...]:
    """The 5-local-then-1-global pattern used by every Gemma 3 size."""
    return tuple(
        AttentionType.GLOBAL
        if (i + 1) % SLIDING_WINDOW_PATTERN == 0
        else AttentionType.LOCAL_SLIDING
        for i in range(num_layers)
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma3Config:
    """Architecture of a Gemma 3 text model.

    Letters used in shape comments throughout the model: B batch, T query
    length, S key length, D embed_dim, F hidden_dim, N num_heads,
    K num_kv_heads, G = N // K, H head_dim, V vocab_size.
    """

    num_layers: int
    vocab_size: int = GEMMA3_VOCAB_SIZE
    embed_dim: int
    hidden_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int
    layer_types: tuple[AttentionType, ...]
    query_pre_attn_scalar: float
    local_rope_base: float = LOCAL_ROPE_BASE
    global_rope_base: float = GLOBAL_ROPE_BASE
    # Linear RoPE scaling on global layers (positions divided by this).
    global_rope_scale: float = 1.0
    rms_norm_eps: float = 1e-6
    # Longest sequence (prompt + generated tokens) the model was trained for.
    # Nothing in the model depends on it (RoPE has no table): the sampler
    # refuses longer work instead of generating past it.
    max_position_embeddings: int = CONTEXT_128K
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None

    def __post_init__(self):
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for"
                f" {self.num_layers} layers."
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of"
                f" num_kv_heads={self.num_kv_heads}."
            )

    @property
    def num_query_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any] | Any) -> Gemma3Config:
        """Builds a config from a Gemma 3 `config.json`'s contents, text-only
        or multimodal (its `text_config`), or from a transformers config
        object (`Gemma3TextConfig` or `Gemma3Config`)."""
        raw = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
        text = hf_config_fields.text_fields(raw)
        if text["use_bidirectional_attention"]:
            raise ValueError(
                "This Gemma 3 config attends bidirectionally (an embedding"
                " model): gsm8k_jax implements the causal language model only."
            )
        rope = text["rope_parameters"]
        global_rope, local_rope = rope["full_attention"], rope["sliding_attention"]
        for name, params in rope.items():
            if params["rope_type"] not in ("default", "linear"):
                raise ValueError(
                    f"Unsupported rope_type {params['rope_type']!r} for {name} layers;"
                    " Gemma 3 uses 'default' or 'linear'."
                )
        if local_rope["rope_type"] != "default":
            raise ValueError("Gemma 3 scales RoPE on global layers only.")
        global_scale = (
            float(global_rope["factor"])
            if global_rope["rope_type"] == "linear"
            else 1.0
        )
        return cls(
            num_layers=text["num_hidden_layers"],
            vocab_size=text["vocab_size"],
            embed_dim=text["hidden_size"],
            hidden_dim=text["intermediate_size"],
            num_heads=text["num_attention_heads"],
            num_kv_heads=text["num_key_value_heads"],
            head_dim=text["head_dim"],
            sliding_window=text["sliding_window"],
            layer_types=tuple(AttentionType(t) for t in text["layer_types"]),
            query_pre_attn_scalar=float(text["query_pre_attn_scalar"]),
            local_rope_base=float(local_rope["rope_theta"]),
            global_rope_base=float(global_rope["rope_theta"]),
            global_rope_scale=global_scale,
            rms_norm_eps=float(text["rms_norm_eps"]),
            max_position_embeddings=int(text["max_position_embeddings"]),
            attn_logit_softcap=text["attn_logit_softcapping"],
            final_logit_softcap=text["final_logit_softcapping"],
        )


def gemma3_270m() -> Gemma3Config:
    return Gemma3Config(
        num_layers=18,
        embed_dim=640,
        hidden_dim=2048,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        sliding_window=512,
        layer_types=gemma3_layer_types(18),
        query_pre_attn_scalar=256,
        max_position_embeddings=CONTEXT_32K,
    )


def gemma3_1b() -> Gemma3Config:
    return Gemma3Config(
        num_layers=26,
        embed_dim=1152,
        hidden_dim=6912,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        sliding_window=512,
        layer_types=gemma3_layer_types(26),
        query_pre_attn_scalar=256,
        max_position_embeddings=CONTEXT_32K,
    )


def gemma3_4b() -> Gemma3Config:
    return Gemma3Config(
        num_layers=34,
        embed_dim=2560,
        hidden_dim=10240,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        sliding_window=1024,
        layer_types=gemma3_layer_types(34),
        query_pre_attn_scalar=256,
        global_rope_scale=8.0,
    )


def gemma3_12b() -> Gemma3Config:
    return Gemma3Config(
        num_layers=48,
        embed_dim=3840,
        hidden_dim=15360,
        num_heads=16,
        num_kv_heads=8,
        head_dim=256,
        sliding_window=1024,
        layer_types=gemma3_layer_types(48),
        query_pre_attn_scalar=256,
        global_rope_scale=8.0,
    )


def gemma3_27b() -> Gemma3Config:
    return Gemma3Config(
        num_layers=62,
        embed_dim=5376,
        hidden_dim=21504,
        num_heads=32,
        num_kv_heads=16,
        head_dim=128,
        sliding_window=1024,
        layer_types=gemma3_layer_types(62),
        query_pre_attn_scalar=5376 / 32,
        global_rope_scale=8.0,
    )


def gemma3_tiny() -> Gemma3Config:
    """The offline demo model: 7 layers so both attention types occur."""
    return Gemma3Config(
        num_layers=7,
        vocab_size=4096,
        embed_dim=128,
        hidden_dim=512,
        num_heads=4,
        num_kv_heads=1,
        head_dim=32,
        sliding_window=64,
        layer_types=gemma3_layer_types(7),
        query_pre_attn_scalar=32,
        max_position_embeddings=8192,
    )


CONFIGS = {
    "gemma3-270m": gemma3_270m,
    "gemma3-1b": gemma3_1b,
    "gemma3-4b": gemma3_4b,
    "gemma3-12b": gemma3_12b,
    "gemma3-27b": gemma3_27b,
    "gemma3-tiny": gemma3_tiny,
}
