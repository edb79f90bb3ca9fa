"""Model config for gemma3-tiny: `--model=configs/gemma3_tiny.py`; fields overridable."""

from gsm8k_jax.eval.run_record import model_config


def get_config():
    return model_config("gemma3-tiny")
