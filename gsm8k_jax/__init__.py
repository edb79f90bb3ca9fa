"""Evaluate Gemma 3 models, base and LoRA-tuned, on GSM8K with JAX and Flax NNX.

The names a notebook needs, e.g.:

    model, tokenizer, _ = gsm8k_jax.load_pretrained("gemma3-tiny")
    sampler = gsm8k_jax.Sampler(model, tokenizer)
    print(sampler.generate(["What is 2 + 3?"])[0].text)
    report = gsm8k_jax.compare_runs(gsm8k_jax.load_runs("results/quickstart"))
    print(report.to_markdown())

notebooks/quickstart.ipynb walks through an evaluation end to end.
"""

from gsm8k_jax.eval.compare import compare_runs, load_run, load_runs, plot_accuracies
from gsm8k_jax.eval.data import load_gsm8k
from gsm8k_jax.eval.extraction import extract_answer, is_correct
from gsm8k_jax.eval.results import RunFiles
from gsm8k_jax.eval.runner import EvalConfig, evaluate
from gsm8k_jax.models.gemma3.config import Gemma3Config
from gsm8k_jax.models.gemma3.model import Gemma3
from gsm8k_jax.models.registry import load_pretrained
from gsm8k_jax.sampling.sampler import Sampler, SamplingParams

__all__ = [
    "EvalConfig",
    "Gemma3",
    "Gemma3Config",
    "RunFiles",
    "Sampler",
    "SamplingParams",
    "compare_runs",
    "evaluate",
    "extract_answer",
    "is_correct",
    "load_gsm8k",
    "load_pretrained",
    "load_run",
    "load_runs",
    "plot_accuracies",
]
