r"""Evaluates a Gemma 3 model with a LoRA checkpoint (Tunix layout) on GSM8K.

    python research/script/eval_gsm8k.py --model.model_name=gemma3-1b-it \
        --model.lora_config.rank=16 --model.lora_checkpoint_path=gs://bucket/run/actor \
        --output_dir=results/lora --batch_size=32

The LoRA factors are attached beside the base weights at load time: each
adapted layer adds their update to its float32 accumulator (`attach_lora`).
"""

from pathlib import Path

from gsm8k_jax.quiet import quiet_imports

quiet_imports()  # Before anything loads transformers.

from gsm8k_jax.eval import script_main

if __name__ == "__main__":
    script_main.run_eval_script(
        lora=True,
        default_model_config=Path(__file__).resolve().parents[2]
        / "configs"
        / "gemma3_tiny.py",
    )
