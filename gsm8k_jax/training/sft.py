"""Supervised fine-tuning on GSM8K solutions: LoRA (qwix) or full, with optax.

    model, tokenizer, _ = load_pretrained("gemma3-tiny", dtype="float32")
    config = SFTConfig(num_steps=200, lora=LoraConfig(rank=16, alpha=16.0))
    model = qwix_lora_model(model, config.lora, seed=config.seed)
    losses = train(model, tokenizer, load_gsm8k(train_path), config,
                   output_dir="runs/sft")

Each example is one chat exchange, the question's prompt and the reference
solution (`training.data`). The loss is next-token cross entropy on the
model turn's tokens only, averaged over those tokens in the batch.

Checkpoints are written every `checkpoint_every` steps and at the end:

* LoRA: the factors, as Tunix saves them, in `<root>/actor/<step>/model_params`
  (local or gs://), which `eval_gsm8k.py --model.lora_checkpoint_path` and
  `checkpoints.lora.load_lora` read; the optimizer state next to them in
  `<root>/actor/<step>/optimizer_state`.
* Full fine-tune: a Hugging Face folder `<root>/hf/<step>/` (config.json,
  model.safetensors in the parameters' dtype, tokenizer files), usable as
  `--model.model_path`, with `optimizer_state/` inside. Local folders only.

Rerunning with the same root resumes from its latest step: weights and
optimizer state (hence the learning-rate schedule) are restored, and the
batch of each step is a function of (seed, step), so with the same config a
resumed run continues as the uninterrupted run would. The settings that
define the steps (`sft_checkpoints.run_settings`) are recorded beside them at the first save
(`<root>/actor/sft_settings.json` or `<root>/hf/sft_settings.json`), and a
resume with other settings is refused (`sft_checkpoints.check_resumable`). A step saved
without optimizer state (a Tunix checkpoint, or a crash between the two
saves) resumes with a fresh optimizer state, and a warning.

A stop signal (Ctrl-C, SIGTERM) under `stop_signals.stop_on_signals()`, as
the training script runs, waits for the step or save in progress, and the
steps trained since the last save are saved before it propagates.

Parameters train in the dtype the model was loaded in: load in float32.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
import transformers
from absl import logging
from flax import nnx
from tqdm.auto import tqdm

from gsm8k_jax import stop_signals, storage
from gsm8k_jax.eval.data import GSM8KExample
from gsm8k_jax.eval.prompts import DEFAULT_PROMPT_TEMPLATE
from gsm8k_jax.models.gemma3.model import Gemma3
from gsm8k_jax.sampling.decode import prompt_positions
from gsm8k_jax.training.config import SFTConfig
from gsm8k_jax.training.data import Batch, batch_indices, make_examples
from gsm8k_jax.training.sft_checkpoints import (
    check_resumable,
    latest_step,
    record_settings,
    restore_checkpoint,
    run_settings,
    save_checkpoint,
)


def loss_fn(model: Gemma3, batch: Batch) -> jax.Array:
    """Mean next-token cross entropy over the batch's answer tokens."""
    valid = batch["valid"]
    hidden, _ = model(batch["tokens"], prompt_positions(valid), valid)
    logits = model.logits(hidden)  # [B, T, V] float32
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@nnx.jit
def train_step(model: Gemma3, optimizer: nnx.Optimizer, batch: Batch) -> jax.Array:
    """One AdamW step on the parameters `optimizer.wrt` selects; returns the loss."""
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt))
    loss, grads = grad_fn(model, batch)
    optimizer.update(model, grads)
    return loss


@functools.lru_cache(maxsize=8)
def _adamw(
    learning_rate: float, warmup_steps: int, num_steps: int, weight_decay: float
) -> optax.GradientTransformation:
    # Cached: the same transformation object for the same settings lets
    # `train_step` reuse its compilation across runs (it is static there).
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(num_steps, warmup_steps + 1),
    )
    return optax.adamw(schedule, weight_decay=weight_decay)


def make_optimizer(model: Gemma3, config: SFTConfig) -> nnx.Optimizer:
    """AdamW, warmup then cosine decay to 0, on the LoRA factors or every weight."""
    tx = _adamw(
        config.learning_rate, config.warmup_steps, config.num_steps, config.weight_decay
    )
    wrt = nnx.LoRAParam if config.lora is not None else nnx.Param
    return nnx.Optimizer(model, tx, wrt=wrt)


def train(
    model: Gemma3,
    tokenizer: transformers.PreTrainedTokenizerBase,
    examples: Sequence[GSM8KExample],
    config: SFTConfig,
    *,
    output_dir: str | os.PathLike | None = None,
    template: str = DEFAULT_PROMPT_TEMPLATE,
    progress: bool = True,
    base_model: str | None = None,
) -> list[float]:
    """Fine-tunes `model` in place on GSM8K examples.

    Args:
      model: with `config.lora`, a model from `qwix_lora_model` (only its LoRA
        factors train); without, a plain Gemma3 (every weight trains).
      tokenizer: the model's tokenizer (chat template included).
      examples: training problems, e.g. `load_gsm8k(train_path)`.
      config: the run's settings.
      output_dir: checkpoint root (LoRA: local or gs://; full: local); None
        saves nothing. Resumes from its latest step if it has one, unless
        it was trained with other settings (`check_resumable`: ValueError).
      template: the user turn; must match the evaluation's prompt template.
      progress: show a tqdm bar with the loss.
      base_model: the base weights' revision (`sources.model_revision` of
        their folder), recorded and checked on resume; None: not checked.

    Returns:
      The loss of each step run by this call (from the resumed step on).

    Raises:
      KeyboardInterrupt, stop_signals.Terminated: a stop signal, once the
        steps trained since the last save are saved (under
        `stop_signals.stop_on_signals()`, a signal waits for the step in
        progress; without it, one that lands inside a step leaves the
        weights half-updated, and they are not saved).
    """
    has_lora = bool(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
    if config.lora is not None and not has_lora:
        raise ValueError(
            "config.lora is set but the model has no LoRA: make it with"
            " checkpoints.lora.qwix_lora_model first."
        )
    if config.lora is None and has_lora:
        raise ValueError(
            "Full fine-tuning (config.lora=None) needs a model without LoRA."
        )
    if config.lora is None and output_dir is not None and storage.is_gcs(output_dir):
        raise ValueError(
            "Full fine-tune checkpoints are written to local folders only."
        )

    data = make_examples(tokenizer, examples, config.max_length, template)
    num_examples = len(data["tokens"])
    if num_examples == 0:
        raise ValueError(
            f"No example fits max_length={config.max_length}: raise max_length."
        )
    if output_dir is not None:
        check_resumable(output_dir, config, examples, template, base_model)
    optimizer = make_optimizer(model, config)
    start = 0
    if (
        output_dir is not None
        and (saved := latest_step(output_dir, config)) is not None
    ):
        restore_checkpoint(model, optimizer, output_dir, saved, config)
        start = saved
        logging.info("Resuming from step %d in %s.", start, output_dir)

    settings = run_settings(config, examples, template, base_model)

    def save(step: int) -> None:
        # The settings first: no step is ever on disk without them.
        record_settings(output_dir, config, settings)
        path = save_checkpoint(model, optimizer, tokenizer, output_dir, step, config)
        logging.info("Saved step %d to %s.", step, path)

    losses: list[float] = []
    done = saved = start  # Steps applied to the model; the latest on disk.
    # Inside a step (the weights may be half-updated) or a save (the step's
    # folder may be half-written): a stop there saves nothing more.
    stepping = saving = False
    try:
        with tqdm(
            range(start, config.num_steps),
            initial=start,
            total=config.num_steps,
            desc="sft",
            disable=not progress,
        ) as bar:
            for step in bar:
                rows = batch_indices(num_examples, config.batch_size, step, config.seed)
                batch = {k: jnp.asarray(v[rows]) for k, v in data.items()}
                with stop_signals.finishing_write():  # A step is whole or not at all.
                    stepping = True
                    losses.append(float(train_step(model, optimizer, batch)))
                    done, stepping = step + 1, False
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if output_dir is not None and (
                    done == config.num_steps
                    or (config.checkpoint_every and done % config.checkpoint_every == 0)
                ):
                    with stop_signals.finishing_write():
                        saving = True
                        save(done)
                        saved, saving = done, False
    except (KeyboardInterrupt, stop_signals.Terminated):
        if output_dir is not None and done > saved and not (stepping or saving):
            with stop_signals.finishing_write(while_stopping=True):
                save(done)
        raise
    return losses
