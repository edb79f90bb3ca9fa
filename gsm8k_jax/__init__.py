"""Evaluate Gemma 3 models, base and LoRA-tuned, on GSM8K with JAX and Flax NNX.

The names a notebook needs, e.g.:

    model, tokenizer, _ = gsm8k_jax.load_pretrained("gemma3-tiny")
    sampler = gsm8k_jax.Sampler(model, tokenizer)
    print(sampler.generate(["What is 2 + 3?"])[0].text)
    lora = gsm8k_jax.LoraConfig(rank=16, alpha=16.0)
    gsm8k_jax.load_lora(model, "runs/tiny-lora/actor", lora)  # attached in place
    gsm8k_jax.detach_lora(model)  # the base model again
    report = gsm8k_jax.compare_runs(gsm8k_jax.load_runs("results/quickstart"))
    print(report.to_markdown())

notebooks/quickstart.ipynb walks through an evaluation end to end.

Each name is imported from its module on first use, so that importing a
module that needs no model (reading and comparing results, the statistics)
does not import jax and flax through this package.
"""

import importlib
import importlib.util
from typing import Any

from gsm8k_jax.quiet import quiet_imports

# Without torch, transformers advises at import that PyTorch was not found;
# this project runs on JAX. Where torch is installed, its advice is the
# user's to see.
if importlib.util.find_spec("torch") is None:
    quiet_imports()

# Public name -> the module defining it.
_EXPORTS = {
    "BUNDLED_TEST_SET": "gsm8k_jax.eval.data",
    "BUNDLED_TRAIN_SET": "gsm8k_jax.eval.data",
    "EvalConfig": "gsm8k_jax.eval.runner",
    "Gemma3": "gsm8k_jax.models.gemma3.model",
    "Gemma3Config": "gsm8k_jax.models.gemma3.config",
    "LoraConfig": "gsm8k_jax.checkpoints.lora_config",
    "RunFiles": "gsm8k_jax.eval.results",
    "Sampler": "gsm8k_jax.sampling.sampler",
    "SamplingParams": "gsm8k_jax.sampling.params",
    "compare_runs": "gsm8k_jax.eval.comparison",
    "detach_lora": "gsm8k_jax.checkpoints.lora",
    "evaluate": "gsm8k_jax.eval.runner",
    "evaluate_checkpoints": "gsm8k_jax.eval.sweep",
    "extract_answer": "gsm8k_jax.eval.extraction",
    "format_prompt": "gsm8k_jax.eval.prompts",
    "is_correct": "gsm8k_jax.eval.extraction",
    "load_gsm8k": "gsm8k_jax.eval.data",
    "load_lora": "gsm8k_jax.checkpoints.lora",
    "load_pretrained": "gsm8k_jax.models.registry",
    "load_run": "gsm8k_jax.eval.runs",
    "load_runs": "gsm8k_jax.eval.runs",
    "lora_mode": "gsm8k_jax.checkpoints.lora_state",
    "model_config": "gsm8k_jax.eval.run_record",
    "plot_accuracies": "gsm8k_jax.eval.report",
    "run_info": "gsm8k_jax.eval.run_record",
    "run_tag": "gsm8k_jax.eval.run_record",
    "run_tag_of": "gsm8k_jax.eval.run_record",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (one list of names: _EXPORTS)


def __getattr__(name: str) -> Any:
    """Imports a public name's module on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gsm8k_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names alone (what tab completion in a notebook offers)."""
    return list(__all__)
