"""Writes the offline demo model `gemma3-tiny` as a Hugging Face folder.

The architecture is `gsm8k_jax.models.gemma3.config.gemma3_tiny()`; the
weights are deterministic random numbers (numpy seed), saved in the HF
Gemma3ForCausalLM safetensors layout next to the packaged tokenizer, so the
main job loads it through exactly the code path a real checkpoint takes.

    python research/script/build_tiny_model.py [--out_dir DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ml_dtypes
import numpy as np
import transformers
from safetensors.numpy import save_file

from gsm8k_jax.models.gemma3.config import Gemma3Config, gemma3_tiny
from gsm8k_jax.models.registry import TINY_MODEL_DIR


def hf_text_config(config: Gemma3Config) -> transformers.Gemma3TextConfig:
    return transformers.Gemma3TextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.embed_dim,
        intermediate_size=config.hidden_dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        sliding_window=config.sliding_window,
        layer_types=[t.value for t in config.layer_types],
        query_pre_attn_scalar=config.query_pre_attn_scalar,
        max_position_embeddings=8192,
        pad_token_id=0,
        eos_token_id=[1, 106],
        bos_token_id=2,
        torch_dtype="bfloat16",
    )


def random_hf_weights(config: Gemma3Config, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, f, h = config.embed_dim, config.hidden_dim, config.head_dim
    normal = lambda *shape, std=0.05: rng.normal(0.0, std, shape)
    tensors = {
        "model.embed_tokens.weight": normal(config.vocab_size, d),
        "model.norm.weight": normal(d),
    }
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": normal(config.num_heads * h, d),
            p + "self_attn.k_proj.weight": normal(config.num_kv_heads * h, d),
            p + "self_attn.v_proj.weight": normal(config.num_kv_heads * h, d),
            p + "self_attn.o_proj.weight": normal(d, config.num_heads * h),
            p + "self_attn.q_norm.weight": normal(h),
            p + "self_attn.k_norm.weight": normal(h),
            p + "mlp.gate_proj.weight": normal(f, d),
            p + "mlp.up_proj.weight": normal(f, d),
            p + "mlp.down_proj.weight": normal(d, f),
        }
        for norm in ("input", "post_attention", "pre_feedforward", "post_feedforward"):
            tensors[p + f"{norm}_layernorm.weight"] = normal(d)
    return {name: t.astype(ml_dtypes.bfloat16) for name, t in tensors.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", type=Path, default=TINY_MODEL_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = gemma3_tiny()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    hf_text_config(config).to_json_file(args.out_dir / "config.json")
    save_file(random_hf_weights(config, args.seed), args.out_dir / "model.safetensors")
    print(f"Wrote gemma3-tiny to {args.out_dir}")


if __name__ == "__main__":
    main()
