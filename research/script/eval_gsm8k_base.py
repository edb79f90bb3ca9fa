r"""Evaluates a base Gemma 3 model (no LoRA) on GSM8K.

    python research/script/eval_gsm8k_base.py --model.model_name=gemma3-1b-it \
        --output_dir=results/base --batch_size=32

Defaults to the offline `gemma3-tiny` model and the bundled test set.
"""

from pathlib import Path

from gsm8k_jax.quiet import quiet_imports

quiet_imports()  # Before anything loads transformers.

from gsm8k_jax.eval import script_main

if __name__ == "__main__":
    script_main.run_eval_script(
        lora=False,
        default_model_config=Path(__file__).resolve().parents[2]
        / "configs"
        / "gemma3_tiny.py",
    )
