r"""Writes the offline demo model `gemma3-tiny` as a Hugging Face folder.

The architecture is `gsm8k_jax.models.gemma3.config.gemma3_tiny()`, saved in
the HF Gemma3ForCausalLM safetensors layout (bfloat16) next to the packaged
tokenizer, so the main job loads it through exactly the code path a real
checkpoint takes.

    python research/script/build_tiny_model.py [--out_dir DIR] [--seed 0]
    python research/script/build_tiny_model.py --from_trained=RUN/hf/STEP

Without --from_trained the weights are deterministic random numbers (numpy
seed). The shipped weights were made from those: a full fine-tune on the
GSM8K train set (800 steps of 8 sequences, 7.8 minutes on 2 CPU cores, final
loss ~2.1), so that answers look like GSM8K solutions and end in `The final
answer is \boxed{N}.<end_of_turn>` (28 of the first 32 test problems, greedy;
accuracy still ~0%):

    python research/script/build_tiny_model.py            # random, seed 0
    python research/script/train_lora_sft.py --full_finetune \\
        --output_dir=/tmp/demo_train --num_steps=800 --batch_size=8 \\
        --max_length=192 --learning_rate=8e-3 --warmup_steps=40
    python research/script/build_tiny_model.py --from_trained=/tmp/demo_train/hf/800
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from gsm8k_jax.models.gemma3.config import Gemma3Config, gemma3_tiny
from gsm8k_jax.models.gemma3.params import export_hf_weights, hf_config, load_hf_model
from gsm8k_jax.models.specs import TINY_MODEL_DIR


def trained_hf_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """A trained gemma3-tiny (any dtype) as bfloat16 HF tensors."""
    model = load_hf_model(model_dir, dtype=jnp.float32)
    if model.config != gemma3_tiny():
        raise ValueError(f"{model_dir} is not a gemma3-tiny: {model.config}")
    return export_hf_weights(model, dtype=jnp.bfloat16)


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
    parser.add_argument(
        "--from_trained",
        type=Path,
        help="HF folder of a trained gemma3-tiny (train_lora_sft.py --full_finetune)",
    )
    args = parser.parse_args()
    config = gemma3_tiny()
    weights = (
        trained_hf_weights(args.from_trained)
        if args.from_trained
        else random_hf_weights(config, args.seed)
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    hf_config(config).to_json_file(args.out_dir / "config.json")
    save_file(weights, args.out_dir / "model.safetensors")
    print(f"Wrote gemma3-tiny to {args.out_dir}")


if __name__ == "__main__":
    main()
