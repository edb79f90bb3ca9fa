"""Tiny random Hugging Face Gemma 3 checkpoints: the reference for parity tests.

transformers' Gemma3ForCausalLM is an independent implementation; running it
and our model on the same random weights is how correctness is proven.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import transformers

# Each variant exercises a different part of the architecture. All have a
# window shorter than test sequences, and three layers: a global one between
# two sliding ones, so both attention types occur, each after the other
# (Gemma 3's own pattern, a global layer every sixth, needs seven layers
# and compiles more than twice as long).
LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention")
TINY_VARIANTS = {
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "gqa_rope_scaled": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    ),
}


def tiny_hf_kwargs(variant: str = "mqa", **overrides) -> dict:
    """`Gemma3TextConfig` keyword arguments of a tiny variant. Another
    `num_hidden_layers` without `layer_types` takes Gemma 3's own pattern."""
    if "num_hidden_layers" in overrides:
        overrides.setdefault("layer_types", None)
    kwargs = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(LAYER_TYPES),
        layer_types=list(LAYER_TYPES),
        head_dim=32,
        sliding_window=8,
        query_pre_attn_scalar=32,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    kwargs.update(TINY_VARIANTS[variant])
    kwargs.update(overrides)
    return kwargs


def tiny_hf_config(variant: str = "mqa", **overrides) -> transformers.Gemma3TextConfig:
    return transformers.Gemma3TextConfig(**tiny_hf_kwargs(variant, **overrides))


def make_tiny_hf_model(
    path: Path, variant: str = "mqa", seed: int = 0, **overrides
) -> transformers.Gemma3ForCausalLM:
    """Builds, randomises (norm weights too) and saves a tiny Gemma 3 to `path`."""
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(tiny_hf_config(variant, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Non-zero norm scales, so a wrong (1 + w) convention would show;
            # small embeddings, so attention (not the residual copy of the
            # input token) drives the output and greedy text is not one
            # token repeated.
            scale = 1.0 if "norm" in name else 0.1 if "embed" in name else 0.5
            p.copy_(torch.randn_like(p) * scale)
    model = model.float().eval()
    model.save_pretrained(path)
    return model


@dataclasses.dataclass
class IdTokenizer:
    """Stands in for a tokenizer: prompts here are token ids already."""

    pad_token_id: int = 0
    bos_token_id: int = 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))
