"""Model config for gemma3-4b-it: `--model=configs/gemma3_4b_it.py`; fields overridable."""

from gsm8k_jax.eval.run_record import model_config


def get_config():
    return model_config("gemma3-4b-it")
