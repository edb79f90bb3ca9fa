"""Model config for gemma3-270m-it: `--model=configs/gemma3_270m_it.py`; fields overridable."""

from gsm8k_jax.eval.run_record import model_config


def get_config():
    return model_config("gemma3-270m-it")
