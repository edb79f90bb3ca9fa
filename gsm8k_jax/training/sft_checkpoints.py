"""Fine-tuning checkpoints: where each step is saved, what settings it was
trained with, and restoring one to resume (the layout: `training.sft`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import transformers
from absl import logging
from etils import epath
from flax import nnx

from gsm8k_jax import storage
from gsm8k_jax.checkpoints import lora_checkpoint
from gsm8k_jax.checkpoints.paths import absolute
from gsm8k_jax.eval.data import GSM8KExample
from gsm8k_jax.eval.prompts import DEFAULT_PROMPT_TEMPLATE
from gsm8k_jax.models.gemma3.model import Gemma3
from gsm8k_jax.models.gemma3.params import (
    CheckpointError,
    load_hf_model,
    save_hf_model,
)
from gsm8k_jax.training.config import SFTConfig

HF_DIR = "hf"  # Full fine-tune checkpoints: <root>/hf/<step>/.
OPTIMIZER_DIR = lora_checkpoint.OPTIMIZER_DIR
# The run's settings (`run_settings`), beside its step folders.
SETTINGS_FILE = lora_checkpoint.TRAINING_SETTINGS_FILE
# SFTConfig fields a resumed run may change: how far it goes, how often it saves.
RESUMABLE_CHANGES = ("num_steps", "checkpoint_every")


def checkpoint_dir(root: str | os.PathLike, config: SFTConfig) -> epath.Path:
    """`<root>/actor` (LoRA) or `<root>/hf` (full fine-tune): the step folders."""
    sub = lora_checkpoint.ACTOR_DIR if config.lora is not None else HF_DIR
    return epath.Path(absolute(root)) / sub


def run_settings(
    config: SFTConfig,
    examples: Sequence[GSM8KExample],
    template: str = DEFAULT_PROMPT_TEMPLATE,
    base_model: str | None = None,
) -> dict[str, Any]:
    """What defines a run's steps, as recorded beside them (JSON values).

    Every SFTConfig field but `RESUMABLE_CHANGES` and `lora` (recorded in
    its own file, which evaluations read), the prompt template, the
    training data (its number of problems and a digest of their text: a
    path may move; the problems and their order are what make the batches)
    and, where given, the base model's revision (`sources.model_revision`:
    an adapter trained on one base goes on training on no other).
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
    if base_model is not None:
        settings["base_model"] = base_model
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
    base_model: str | None = None,
) -> None:
    """Refuses to continue a run under `root` with other settings than it was
    trained with, naming each differing one (the base model only where both
    the run and this call name it).

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
    settings = run_settings(config, examples, template, base_model)
    if "base_model" not in recorded:  # Recorded since 2026-12-07.
        settings.pop("base_model", None)
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
        # Training resumed before this step, so a folder of it is a save cut
        # short (Orbax writes in place on gs:// and marks the step last).
        if step_dir.exists():
            logging.warning(
                "Rewriting step %d in %s: its save was cut short.", step, step_dir
            )
            step_dir.rmtree()
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
