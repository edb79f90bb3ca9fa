"""Supervised fine-tuning on GSM8K solutions: LoRA (qwix) or full, with optax.

    model, tokenizer, _ = load_pretrained("gemma3-tiny", dtype="float32")
    config = SFTConfig(num_steps=200, lora=LoraConfig(rank=16, alpha=16.0))
    model = qwix_lora_model(model, config.lora, seed=config.seed)
    losses = train(model, tokenizer, load_gsm8k(train_path), config,
                   output_dir="runs/sft")

Each example is one chat exchange. The user turn is the question in the
evaluation's prompt (`format_prompt`, so training and evaluation see the
same text); the model turn is the reference solution rewritten to end the
way strict extraction scores it (`... The final answer is \\boxed{72}.`),
closed by `<end_of_turn>`, the stop token. The loss is next-token cross
entropy on the model turn's tokens only, averaged over those tokens in the
batch.

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
define the steps (`run_settings`) are recorded beside them at the first save
(`<root>/actor/sft_settings.json` or `<root>/hf/sft_settings.json`), and a
resume with other settings is refused (`check_resumable`). A step saved
without optimizer state (a Tunix checkpoint, or a crash between the two
saves) resumes with a fresh optimizer state, and a warning.

A stop signal (Ctrl-C, SIGTERM) under `stop_signals.stop_on_signals()`, as
the training script runs, waits for the step or save in progress, and the
steps trained since the last save are saved before it propagates.

Parameters train in the dtype the model was loaded in: load in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import transformers
from absl import logging
from etils import epath
from flax import nnx
from tqdm.auto import tqdm

from gsm8k_jax import stop_signals, storage
from gsm8k_jax.checkpoints import lora as lora_lib
from gsm8k_jax.checkpoints import lora_checkpoint
from gsm8k_jax.checkpoints.paths import absolute
from gsm8k_jax.eval.data import GSM8KExample
from gsm8k_jax.eval.prompts import DEFAULT_PROMPT_TEMPLATE, format_prompt
from gsm8k_jax.models.gemma3.model import Gemma3
from gsm8k_jax.models.gemma3.params import (
    CheckpointError,
    load_hf_model,
    save_hf_model,
)
from gsm8k_jax.sampling.decode import prompt_positions

END_OF_TURN = "<end_of_turn>"
HF_DIR = "hf"  # Full fine-tune checkpoints: <root>/hf/<step>/.
OPTIMIZER_DIR = "optimizer_state"
# The run's settings (`run_settings`), beside its step folders.
SETTINGS_FILE = "sft_settings.json"
# SFTConfig fields a resumed run may change: how far it goes, how often it saves.
RESUMABLE_CHANGES = ("num_steps", "checkpoint_every")

# {'tokens', 'targets': int32, 'loss_mask': float32, 'valid': bool}, each
# [N, max_length]; targets[:, t] is the token after tokens[:, t].
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Settings of a fine-tuning run.

    Attributes:
      learning_rate: peak of the warmup-then-cosine schedule (decays to 0 at
        `num_steps`).
      warmup_steps: linear warmup from 0.
      num_steps: total optimizer steps (a resumed run counts from its
        checkpoint's step, and may raise it: the cosine then stretches to
        the new end, so the steps after the resumed one differ from those of
        a run started with the new value).
      batch_size: sequences per step.
      max_length: model input length; longer examples are dropped.
      weight_decay: AdamW's decoupled weight decay.
      checkpoint_every: save every this many steps (0: at the end only, or
        when a stop signal ends the run).
      seed: batch order and LoRA initialisation.
      lora: LoRA settings (alpha / rank scales the update); None trains every
        parameter (full fine-tune).
    """

    learning_rate: float = 1e-3
    warmup_steps: int = 10
    num_steps: int = 100
    batch_size: int = 8
    max_length: int = 384
    weight_decay: float = 0.0
    checkpoint_every: int = 0
    seed: int = 0
    lora: lora_lib.LoraConfig | None = dataclasses.field(
        default_factory=lora_lib.LoraConfig
    )

    def __post_init__(self):
        for name in ("num_steps", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("warmup_steps", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_FINAL_LINE = re.compile(r"\n?####\s*(.+?)\s*$")


def format_answer(solution: str) -> str:
    """A GSM8K reference solution as the model turn's text.

    Calculator annotations (`<<48/2=24>>`) are removed and the final `#### N`
    line becomes `The final answer is \\boxed{N}.`:

        'She sold 48/2 = <<48/2=24>>24 clips.\\n#### 24'
        -> 'She sold 48/2 = 24 clips.\\nThe final answer is \\boxed{24}.'

    Raises:
      ValueError: the solution has no final `#### N` line.
    """
    text = _CALCULATOR.sub("", solution).rstrip()
    match = _FINAL_LINE.search(text)
    if match is None:
        raise ValueError(f"No final '#### N' line in the solution {solution!r}.")
    reasoning = text[: match.start()].rstrip()
    final = f"The final answer is \\boxed{{{match[1]}}}."
    return f"{reasoning}\n{final}" if reasoning else final


def make_examples(
    tokenizer: transformers.PreTrainedTokenizerBase,
    examples: Sequence[GSM8KExample],
    max_length: int,
    template: str = DEFAULT_PROMPT_TEMPLATE,
) -> Batch:
    """Tokenizes (prompt, answer) pairs into right-padded training arrays.

    The prompt is `format_prompt(question, template=template)` (chat
    template, `<bos>` included); the answer is `format_answer(solution)`
    followed by `<end_of_turn>`. Each is tokenized on its own, as the
    sampler tokenizes prompts, so training sees the token boundary that
    evaluation does.

    A sequence of n tokens gives n - 1 model inputs. Examples with more than
    max_length + 1 tokens are dropped, not truncated (a cut answer would
    teach the model to stop before its `\\boxed{}`); a log line counts them.

    Returns:
      A `Batch` of the kept examples, in order: loss_mask is 1 where the
      target is an answer token (`<end_of_turn>` included).
    """
    prompts = [
        format_prompt(e.question, tokenizer, template=template) for e in examples
    ]
    answers = [format_answer(e.answer) + END_OF_TURN for e in examples]
    prompt_ids = tokenizer(prompts, add_special_tokens=False).input_ids
    answer_ids = tokenizer(answers, add_special_tokens=False).input_ids
    kept = [
        (p, a)
        for p, a in zip(prompt_ids, answer_ids)
        if len(p) + len(a) <= max_length + 1
    ]
    if len(kept) < len(examples):
        logging.info(
            "Dropped %d of %d examples longer than max_length=%d + 1 tokens.",
            len(examples) - len(kept),
            len(examples),
            max_length,
        )
    n = len(kept)
    batch = {
        "tokens": np.full((n, max_length), tokenizer.pad_token_id, np.int32),
        "targets": np.full((n, max_length), tokenizer.pad_token_id, np.int32),
        "loss_mask": np.zeros((n, max_length), np.float32),
        "valid": np.zeros((n, max_length), bool),
    }
    for row, (prompt, answer) in enumerate(kept):
        sequence = np.asarray(prompt + answer, np.int32)
        length = len(sequence) - 1
        batch["tokens"][row, :length] = sequence[:-1]
        batch["targets"][row, :length] = sequence[1:]
        batch["valid"][row, :length] = True
        # Target t is token t + 1: the answer's tokens are targets
        # len(prompt) - 1 onwards.
        batch["loss_mask"][row, len(prompt) - 1 : length] = 1.0
    return batch


@functools.lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(
    num_examples: int, batch_size: int, step: int, seed: int
) -> np.ndarray:
    """The examples of step `step` (0-based): a fresh shuffle every epoch.

    A pure function of its arguments, so a resumed run sees the batches the
    uninterrupted run would have.
    """
    positions = step * batch_size + np.arange(batch_size)
    epochs, offsets = np.divmod(positions, num_examples)
    return np.array(
        [_epoch_order(num_examples, seed, int(e))[o] for e, o in zip(epochs, offsets)]
    )


# --------------------------------------------------------------------------
# Model, loss, step
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------


def checkpoint_dir(root: str | os.PathLike, config: SFTConfig) -> epath.Path:
    """`<root>/actor` (LoRA) or `<root>/hf` (full fine-tune): the step folders."""
    sub = lora_checkpoint.ACTOR_DIR if config.lora is not None else HF_DIR
    return epath.Path(absolute(root)) / sub


def run_settings(
    config: SFTConfig,
    examples: Sequence[GSM8KExample],
    template: str = DEFAULT_PROMPT_TEMPLATE,
) -> dict[str, Any]:
    """What defines a run's steps, as recorded beside them (JSON values).

    Every SFTConfig field but `RESUMABLE_CHANGES` and `lora` (recorded in
    its own file, which evaluations read), the prompt template, and the
    training data: its number of problems and a digest of their text (a
    path may move; the problems and their order are what make the batches).
    """
    settings = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in (*RESUMABLE_CHANGES, "lora")
    }
    text = json.dumps([[e.question, e.answer] for e in examples])
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    settings["prompt_template"] = template
    settings["data"] = f"{len(examples)} problems, sha256 {digest}"
    return json.loads(json.dumps(settings))


def _settings_path(root: str | os.PathLike, config: SFTConfig) -> str:
    return str(checkpoint_dir(root, config) / SETTINGS_FILE)


def record_settings(
    root: str | os.PathLike, config: SFTConfig, settings: dict[str, Any]
) -> None:
    """Writes `settings` (`run_settings`) beside the step folders under `root`."""
    storage.write_atomic(
        _settings_path(root, config), json.dumps(settings, indent=2) + "\n"
    )


def check_resumable(
    root: str | os.PathLike,
    config: SFTConfig,
    examples: Sequence[GSM8KExample],
    template: str = DEFAULT_PROMPT_TEMPLATE,
) -> None:
    """Refuses to continue a run under `root` with other settings than it was
    trained with, naming each differing one.

    A LoRA run's rank, alpha and module_path (`lora_config.json`) are what
    every evaluation of its earlier steps uses; its other settings
    (`run_settings`, in `SETTINGS_FILE`) are what its steps were trained
    with. A run saved before either was recorded is not checked against it.
    """
    folder = checkpoint_dir(root, config)
    recorded_lora = (
        lora_checkpoint.recorded_lora_config(folder) if config.lora else None
    )
    if recorded_lora is not None and recorded_lora != config.lora:
        differing = [
            f"{name}={getattr(config.lora, name)!r} (trained with"
            f" {getattr(recorded_lora, name)!r})"
            for name in config.lora.differing_fields(recorded_lora)
        ]
        raise ValueError(
            f"{folder} was trained with another LoRA config: {', '.join(differing)}"
            f" ({folder / lora_checkpoint.LORA_CONFIG_FILE}): pass the trained"
            " values to resume it, or another --output_dir for a new run."
        )
    path = _settings_path(root, config)
    # Settings with no step beside them (a first save cut short) bind nothing.
    if not storage.exists(path) or latest_step(root, config) is None:
        return
    try:
        recorded = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is damaged (not valid JSON: {e.msg}): restore it, or train"
            " into another --output_dir."
        ) from e
    settings = run_settings(config, examples, template)
    # A setting added after the run was saved: it trained with the default.
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(SFTConfig)
        if f.default is not dataclasses.MISSING
    }
    recorded = {**defaults, **recorded}
    differing = [
        f"{name}={settings.get(name)!r} (trained with {recorded.get(name)!r})"
        for name in settings
        if settings[name] != recorded.get(name)
    ]
    if differing:
        raise ValueError(
            f"{folder} was trained with other settings: {', '.join(differing)}"
            f" ({path}): pass the trained values (the same --data_path and"
            " --num_examples for data) to resume it, or another --output_dir for"
            " a new run."
        )


def latest_step(root: str | os.PathLike, config: SFTConfig) -> int | None:
    """The latest complete checkpoint's step under `root`, or None."""
    folder = checkpoint_dir(root, config)
    if not folder.exists():
        return None
    if config.lora is not None:
        if not any(c.name.isdigit() for c in folder.iterdir()):
            return None
        params = epath.Path(lora_checkpoint.resolve_lora_checkpoint(folder))
        return int(params.parent.name)
    steps = [
        int(c.name)
        for c in folder.iterdir()
        if c.name.isdigit() and (c / "model.safetensors").exists()
    ]
    return max(steps, default=None)


def _param_dtype(model: Gemma3) -> jnp.dtype:
    return model.embedder.input_embedding.get_value().dtype


def _save_optimizer(optimizer: nnx.Optimizer, path: epath.Path) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, nnx.to_pure_dict(nnx.state(optimizer)))
    checkpointer.wait_until_finished()
    checkpointer.close()


def _restore_optimizer(optimizer: nnx.Optimizer, path: epath.Path) -> bool:
    """Restores the optimizer state saved in `path`; False if there is none."""
    if not path.exists():
        return False
    state = nnx.state(optimizer)
    # Restored to host, then placed as fresh arrays are (uncommitted): arrays
    # committed to a device would make `train_step` compile twice more.
    target = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
    checkpointer = ocp.StandardCheckpointer()
    restored = checkpointer.restore(path, target)
    checkpointer.close()
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, restored))
    nnx.update(optimizer, state)
    return True


def save_checkpoint(
    model: Gemma3,
    optimizer: nnx.Optimizer,
    tokenizer: transformers.PreTrainedTokenizerBase,
    root: str | os.PathLike,
    step: int,
    config: SFTConfig,
) -> str:
    """Writes step `step` (see the module docstring); returns its folder."""
    step_dir = checkpoint_dir(root, config) / str(step)
    if config.lora is not None:
        lora_checkpoint.save_lora_config(checkpoint_dir(root, config), config.lora)
        lora_checkpoint.save_lora_params(model, root, step)
        _save_optimizer(optimizer, step_dir / OPTIMIZER_DIR)
        return str(step_dir)
    # Written under a temporary name, then renamed: a step folder is complete.
    step_dir = Path(step_dir)
    tmp = step_dir.with_name(f".tmp-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_model(model, tmp, tokenizer=tokenizer, dtype=_param_dtype(model))
    _save_optimizer(optimizer, epath.Path(tmp / OPTIMIZER_DIR))
    shutil.rmtree(step_dir, ignore_errors=True)
    tmp.rename(step_dir)
    return str(step_dir)


def _set_lora_params(model: Gemma3, params: dict[str, np.ndarray]) -> None:
    """Sets the model's LoRA factors to `params` ('layers/0/.../w_lora_a' keys)."""
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
    keys = {"/".join(map(str, path)) for path, _ in flat}
    if keys != set(params):
        missing, extra = sorted(keys - set(params)), sorted(set(params) - keys)
        raise CheckpointError(
            f"The checkpoint's LoRA factors do not match the model's (missing"
            f" {missing[:3]}, unexpected {extra[:3]}): another module_path?"
        )
    filled = []
    for path, variable in flat:
        value = params["/".join(map(str, path))]
        current = variable.get_value()
        if tuple(value.shape) != current.shape:
            raise CheckpointError(
                f"{'/'.join(map(str, path))} is {list(value.shape)} in the"
                f" checkpoint, {list(current.shape)} in the model: another rank?"
            )
        filled.append((path, variable.replace(jnp.asarray(value, current.dtype))))
    nnx.update(model, nnx.from_flat_state(filled))


def restore_checkpoint(
    model: Gemma3,
    optimizer: nnx.Optimizer,
    root: str | os.PathLike,
    step: int,
    config: SFTConfig,
) -> None:
    """Loads step `step`'s weights (and optimizer state, when saved) in place."""
    step_dir = checkpoint_dir(root, config) / str(step)
    if config.lora is not None:
        _set_lora_params(model, lora_checkpoint.restore_lora_params(step_dir))
    else:
        saved = load_hf_model(step_dir, dtype=_param_dtype(model))
        if saved.config != model.config:
            raise CheckpointError(f"{step_dir} holds another architecture.")
        nnx.update(model, nnx.state(saved, nnx.Param))
    if not _restore_optimizer(optimizer, step_dir / OPTIMIZER_DIR):
        logging.warning(
            "%s has no %s: resuming with a fresh optimizer (the learning-rate"
            " schedule restarts).",
            step_dir,
            OPTIMIZER_DIR,
        )


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------


def train(
    model: Gemma3,
    tokenizer: transformers.PreTrainedTokenizerBase,
    examples: Sequence[GSM8KExample],
    config: SFTConfig,
    *,
    output_dir: str | os.PathLike | None = None,
    template: str = DEFAULT_PROMPT_TEMPLATE,
    progress: bool = True,
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
        check_resumable(output_dir, config, examples, template)
    optimizer = make_optimizer(model, config)
    start = 0
    if (
        output_dir is not None
        and (saved := latest_step(output_dir, config)) is not None
    ):
        restore_checkpoint(model, optimizer, output_dir, saved, config)
        start = saved
        logging.info("Resuming from step %d in %s.", start, output_dir)

    settings = run_settings(config, examples, template)

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
