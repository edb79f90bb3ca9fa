"""Tunix LoRA checkpoints on disk: find, read and write them (Orbax).

Tunix trains LoRA with qwix and saves only the adapter factors, with Orbax:

    <root>/actor/<step>/model_params/   (PyTree checkpoint; also
                                         optimizer_state/ and step metadata)

Keys mirror the model: `layers/3/attn/q_einsum/w_lora_a`,
`layers/3/mlp/down_proj/kernel_lora_b`, ... (possibly with a trailing
`value` level per leaf, depending on the flax version that saved them).
alpha is not stored in checkpoints: our trainer records rank, alpha and
module_path beside the step folders (`lora_config.json`), Tunix does not.
Local folders and `gs://` alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from orbax.checkpoint import v1 as ocp_v1

from gsm8k_jax import storage
from gsm8k_jax.checkpoints import orbax_reads
from gsm8k_jax.checkpoints.lora_config import CONFIG_FLAG, LoraConfig, named_setting
from gsm8k_jax.checkpoints.paths import absolute, existing_path, storage_call
from gsm8k_jax.models.gemma3.params import CheckpointError

ACTOR_DIR = "actor"
PARAMS_DIR = "model_params"
OPTIMIZER_DIR = "optimizer_state"  # Beside it in a step folder (Tunix, ours).
_PYTREE_METADATA_FILE = "_METADATA"  # Written by Orbax in every PyTree checkpoint.
# Written by Orbax's CheckpointManager into a step folder once it is complete.
COMMIT_MARKER = "commit_success.txt"
# Rank, alpha and module_path, written by our trainer beside the step folders
# (`<root>/actor/lora_config.json`); Tunix ignores it and writes none.
LORA_CONFIG_FILE = "lora_config.json"
# The trainer's other settings, beside them too; among them the revision of
# the base weights (`sources.model_revision`) it trained on, as "base_model".
TRAINING_SETTINGS_FILE = "sft_settings.json"
# A factor's name: `<weight>_lora_a` or `<weight>_lora_b`.
FACTOR_NAME = re.compile(r"(.+)_lora_([ab])")
# What tensorstore appends to an error: the whole spec of the array it failed
# on, about 1,000 characters of JSON that say nothing to a user.
_TENSORSTORE_SPEC = re.compile(r"\s*\[tensorstore_spec=.*\]", re.DOTALL)
# How much of an error reading a damaged checkpoint its message keeps.
_REASON_CHARS = 240

LoraParams = dict[str, np.ndarray | jax.Array]


def _is_pytree_checkpoint(path: epath.Path) -> bool:
    return storage_call(path, (path / _PYTREE_METADATA_FILE).exists)


def resolve_lora_checkpoint(path: str | os.PathLike) -> str:
    """The `model_params` folder that `path` designates.

    Args:
      path: local or `gs://`; one of `<root>/actor` (its latest integer step
        is used), a step folder `<root>/actor/<step>`, or a `model_params`
        folder.

    Raises:
      CheckpointError: the path is missing, unreadable or a file, or holds no
        step folders or no `model_params`.
    """
    folder = existing_path(path, "LoRA checkpoint")
    if not storage_call(folder, folder.is_dir):
        raise CheckpointError(
            f"{path} is a file, not a LoRA checkpoint folder (expected"
            f" <root>/{ACTOR_DIR}/<step>/{PARAMS_DIR}, a step folder"
            f" <root>/{ACTOR_DIR}/<step> or <root>/{ACTOR_DIR}): pass the folder."
        )
    if _is_pytree_checkpoint(folder):
        if folder.name == OPTIMIZER_DIR:
            raise CheckpointError(
                f"{path} is the step's optimizer state, not its LoRA factors: pass"
                f" {folder.parent / PARAMS_DIR} (or the step folder {folder.parent})."
            )
        return str(folder)
    params = folder / PARAMS_DIR
    if storage_call(params, params.exists):
        if not _is_pytree_checkpoint(params):
            raise CheckpointError(
                f"{params} is not an Orbax PyTree checkpoint (no"
                f" {_PYTREE_METADATA_FILE}): an unfinished save?"
            )
        return str(params)

    children = storage_call(folder, lambda: sorted(c.name for c in folder.iterdir()))
    steps = [int(name) for name in children if name.isdigit()]
    if not steps:
        hint = f" Did you mean {folder / ACTOR_DIR}?" if ACTOR_DIR in children else ""
        found = f"it holds {children[:10]}" if children else "it is empty"
        raise CheckpointError(
            f"No LoRA checkpoint in {path}: expected integer step folders"
            f" (<root>/{ACTOR_DIR}/<step>/{PARAMS_DIR}), a step folder or a"
            f" {PARAMS_DIR} folder, but {found}.{hint}"
        )
    latest = _latest_committed(folder, steps)
    params = latest / PARAMS_DIR
    if not _is_pytree_checkpoint(params):
        raise CheckpointError(
            f"The latest step folder {latest} has no {PARAMS_DIR} checkpoint: an"
            " unfinished save? Pass an earlier step folder explicitly."
        )
    return str(params)


def _latest_committed(folder: epath.Path, steps: list[int]) -> epath.Path:
    """The latest step folder that Orbax marked committed, when it marks any:
    on `gs://` Orbax writes a step in place and marks it at the end (Tunix's
    trainer does), so a later unmarked step is still being written or its
    save failed. Writers that mark no step (ours) are taken at their latest."""
    marked = storage_call(
        folder,
        lambda: {p.parent.name for p in folder.glob(f"*/{COMMIT_MARKER}")},
    )
    committed = max((step for step in steps if str(step) in marked), default=None)
    if committed is None or committed == max(steps):
        return folder / str(max(steps))
    logging.warning(
        "Steps after %d in %s are not committed (no %s: still being written, or"
        " their save failed); using step %d.",
        committed,
        folder,
        COMMIT_MARKER,
        committed,
    )
    return folder / str(committed)


def _key(path: tuple[Any, ...]) -> str:
    """'/'-joined tree path, without the trailing `value` some flax versions add."""
    key = jax.tree_util.keystr(path, simple=True, separator="/")
    return key.removesuffix("/value")


def restore_lora_params(path: str | os.PathLike) -> LoraParams:
    """Reads the LoRA factors of a checkpoint as host arrays.

    Args:
      path: anything `resolve_lora_checkpoint` accepts, local or `gs://`.

    Returns:
      {'layers/3/attn/q_einsum/w_lora_a': array, ...}, sorted by key. Other
      leaves (a checkpoint of the full model state) are skipped unread.
    """
    params_dir = epath.Path(resolve_lora_checkpoint(path))
    with _named_damage(params_dir), orbax_reads.reads_finish_before_failing():
        params = _restore_factors(params_dir)
    logging.info("Restored %d LoRA factors from %s.", len(params), params_dir)
    return params


@contextlib.contextmanager
def _named_damage(params_dir: epath.Path) -> Iterator[None]:
    """A checkpoint that cannot be read, as a CheckpointError naming it."""
    try:
        yield
    # JSON, tensorstore, tree; AttributeError: a _METADATA of another shape.
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(
            f"{params_dir} is damaged or incomplete ({_brief_reason(e)}):"
            " evaluate another step, or write this one again."
        ) from e


def _brief_reason(e: Exception) -> str:
    """Why a checkpoint could not be read, in a line: tensorstore's message
    without the spec it appends and, where still long, only its first two
    clauses (what failed) and its last (the cause)."""
    text = " ".join(_TENSORSTORE_SPEC.sub("", str(e)).split())
    clauses = text.split(": ")
    if len(text) > _REASON_CHARS and len(clauses) > 3:
        text = ": ".join([*clauses[:2], "...", clauses[-1]])
    if len(text) > _REASON_CHARS:
        text = text[: _REASON_CHARS - 3] + "..."
    return f"{type(e).__name__}: {text}"


def lora_factor_shapes(
    params_path: str | os.PathLike,
) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and dtypes of the LoRA factors of a resolved
    `model_params` folder, from Orbax's metadata alone (no array is read):
    enough to check the factors fit a model before anything is loaded."""
    params_dir = epath.Path(params_path)
    # Wrapped as a restore is: a metadata read outside the wrap, before a
    # restore that fails, brought back the tracebacks the wrap stops (seen;
    # the cause inside Orbax not traced).
    with _named_damage(params_dir), orbax_reads.reads_finish_before_failing():
        tree = _metadata_tree(ocp.PyTreeCheckpointHandler(), params_dir)
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {
            _key(p): jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype)
            for p, meta in sorted(flat, key=lambda item: _key(item[0]))
            if _is_factor(p)
        }


def _metadata_tree(handler: ocp.PyTreeCheckpointHandler, params_dir: epath.Path) -> Any:
    """Orbax's metadata of each leaf of the checkpoint (shapes, no arrays)."""
    return storage_call(params_dir, lambda: handler.metadata(params_dir).tree)


def _is_factor(keypath: tuple[Any, ...]) -> bool:
    return FACTOR_NAME.fullmatch(_key(keypath).rsplit("/", 1)[-1]) is not None


def _restore_factors(params_dir: epath.Path) -> LoraParams:
    """The LoRA factors of a resolved `model_params` folder, sorted by key."""
    handler = ocp.PyTreeCheckpointHandler()
    tree = _metadata_tree(handler, params_dir)

    # Restore the factors only, as numpy (no device or sharding assumptions).
    item = jax.tree_util.tree_map_with_path(
        lambda p, meta: meta if _is_factor(p) else ocp.PLACEHOLDER, tree
    )
    restore_args = jax.tree_util.tree_map_with_path(
        lambda p, _: (
            ocp.RestoreArgs(restore_type=np.ndarray)
            if _is_factor(p)
            else ocp.PLACEHOLDER
        ),
        tree,
    )
    checkpointer = ocp.Checkpointer(handler)
    restored = storage_call(
        params_dir,
        lambda: checkpointer.restore(
            params_dir,
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args),
        ),
    )
    flat = jax.tree_util.tree_flatten_with_path(restored)[0]
    params = {_key(p): v for p, v in flat if _is_factor(p)}
    return dict(sorted(params.items()))


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def save_lora_config(actor_dir: str | os.PathLike, config: LoraConfig) -> None:
    """Records how the adapter is trained, beside its step folders."""
    folder = epath.Path(absolute(actor_dir))
    folder.mkdir(parents=True, exist_ok=True)
    # Atomic: the trainer rewrites it at every save while evaluations may read it.
    storage.write_atomic(
        str(folder / LORA_CONFIG_FILE),
        json.dumps(dataclasses.asdict(config), indent=2) + "\n",
    )


def _actor_dir(params_path: str | os.PathLike) -> epath.Path:
    """The folder of the step folders (`<root>/actor`) of a resolved
    `.../actor/<step>/model_params` checkpoint: where our trainer's records are."""
    return epath.Path(params_path).parent.parent


def read_lora_config(params_path: str | os.PathLike) -> LoraConfig | None:
    """The config recorded for a resolved `.../actor/<step>/model_params`
    checkpoint, or None where none was recorded (Tunix's own checkpoints)."""
    return recorded_lora_config(_actor_dir(params_path))


def recorded_lora_config(actor_dir: str | os.PathLike) -> LoraConfig | None:
    """The config recorded beside the step folders of `actor_dir`, or None."""
    recorded = epath.Path(actor_dir) / LORA_CONFIG_FILE
    if not storage_call(recorded, recorded.exists):
        return None
    try:
        return LoraConfig(**json.loads(storage_call(recorded, recorded.read_text)))
    except (ValueError, TypeError) as e:  # JSON, fields, values (alpha <= 0).
        raise CheckpointError(f"{recorded} cannot be used: {e}") from e


@dataclasses.dataclass(frozen=True)
class TrainedLora:
    """A checkpoint found, and the config to use it with."""

    params_path: str  # its `model_params` folder (`resolve_lora_checkpoint`)
    config: LoraConfig
    recorded: bool  # the config is our trainer's record, not the one given
    # The base weights' revision our trainer recorded, or None (Tunix's own
    # checkpoints, and ours from before 2026-12-07).
    base_model: str | None = None
    # The user turn of the prompts our trainer trained on (chat-templated,
    # with no system turn), or None (Tunix's own checkpoints).
    prompt_template: str | None = None

    @property
    def settings_path(self) -> epath.Path:
        """Where our trainer records its settings for this checkpoint."""
        return _actor_dir(self.params_path) / TRAINING_SETTINGS_FILE

    def base_model_warning(
        self,
        revision: str,
        model_dir: str | os.PathLike,
        setting: str = "--model.model_path",
    ) -> str:
        """Why this adapter may not fit the weights of `revision` (at
        `model_dir`, chosen by `setting`), or "" where nothing says so."""
        if self.base_model is None or self.base_model == revision:
            return ""
        return (
            f"the LoRA checkpoint was trained on base weights {self.base_model}"
            f" ({self.settings_path}), but {model_dir} holds {revision}: merged into other"
            f" weights, an adapter gives other answers. Check {setting} (a hub"
            " snapshot and a local copy of the same weights are named"
            " differently)."
        )


def resolve_trained_lora(
    path: str | os.PathLike,
    config: LoraConfig | None,
    *,
    given: Collection[str] | None = None,
) -> TrainedLora:
    """The checkpoint that `path` designates, with its rank, alpha and
    module_path: those our trainer recorded beside it, where a field of
    `config` named in `given` (the flags given; None: every field) must not
    contradict them; else (Tunix's own checkpoints record none) `config`,
    which is then required."""
    params_path = resolve_lora_checkpoint(path)
    recorded = read_lora_config(params_path)
    training = _recorded_training_settings(_actor_dir(params_path))
    return TrainedLora(
        params_path,
        _effective_lora_config(config, recorded, given=given, where=params_path),
        recorded is not None,
        _text_or_none(training.get("base_model")),
        _text_or_none(training.get("prompt_template")),
    )


def _recorded_training_settings(actor_dir: epath.Path) -> dict[str, Any]:
    """The settings the trainer recorded beside the step folders, or {}
    (none recorded, or a record that cannot be read: the trainer's own
    resume reports that one)."""
    settings = actor_dir / TRAINING_SETTINGS_FILE
    if not storage_call(settings, settings.exists):
        return {}
    try:
        recorded = json.loads(storage_call(settings, settings.read_text))
    except json.JSONDecodeError:
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _effective_lora_config(
    config: LoraConfig | None,
    recorded: LoraConfig | None,
    *,
    given: Collection[str] | None = None,
    where: str | os.PathLike,
) -> LoraConfig:
    """The rank, alpha and module_path to use the checkpoint at `where` (a
    resolved `model_params` folder) with.

    Recorded by our trainer: used, and a field of `config` that contradicts
    it is refused (the wrong alpha silently changes every answer) where
    `given` names it (command-line flags given; None: every field of
    `config`). Not recorded (Tunix's own checkpoints): `config`, which is
    then required.
    """
    recorded_at = _actor_dir(where) / LORA_CONFIG_FILE
    if recorded is None:
        if config is None:
            raise CheckpointError(
                f"{where} records no rank and alpha (no {recorded_at}; Tunix"
                " writes none): pass the training run's, LoraConfig(rank=...,"
                f" alpha=...) or {CONFIG_FLAG}.rank and .alpha."
            )
        if not config.alpha_given:
            # A wrong rank is refused (the factors' shapes show it); a wrong
            # alpha only scales every update, and changes every answer.
            logging.warning(
                "%s records no LoRA alpha (Tunix writes none): using LoraConfig's"
                " default alpha=%s (update scale alpha/rank = %g). If training"
                " used another, pass it: LoraConfig(rank=%d, alpha=...) or"
                " %s.alpha (Tunix's GSM8K examples train with alpha 64.0).",
                where,
                config.alpha,
                config.scale,
                config.rank,
                CONFIG_FLAG,
            )
        return config
    if config is not None:
        differing = config.differing_fields(recorded)
        contradicted = sorted(f for f in differing if given is None or f in given)
        if contradicted:
            field = contradicted[0]
            raise ValueError(
                f"{named_setting(field, getattr(config, field))}, but the checkpoint"
                f" was trained with {field}={getattr(recorded, field)!r}"
                f" ({recorded_at}): drop it or pass the trained value."
            )
    return recorded


def save_lora_params(
    model_or_params: nnx.Module | Mapping[str, np.ndarray | jax.Array],
    root: str | os.PathLike,
    step: int,
) -> str:
    """Writes LoRA factors as Tunix does: `<root>/actor/<step>/model_params`.

    Args:
      model_or_params: a model with LoRA applied (its `nnx.LoRAParam`s are
        saved, as Tunix saves them) or a flat dict as `restore_lora_params`
        returns.
      root: local folder, or `gs://` (Orbax writes to Cloud Storage directly).
      step: the training step, the name of the step folder.

    Returns:
      The path of the `model_params` folder written.
    """
    if isinstance(model_or_params, nnx.Module):
        tree = nnx.state(model_or_params, nnx.LoRAParam)
        if not nnx.to_flat_state(tree):
            raise CheckpointError(
                "The model has no LoRA parameters to save (merged already, or"
                " LoRA never applied?)."
            )
    else:
        tree = _nest(model_or_params)
    root = absolute(root)
    checkpointer = ocp_v1.training.Checkpointer(epath.Path(root) / ACTOR_DIR)
    try:
        checkpointer.save_checkpointables(step, {PARAMS_DIR: tree})
    finally:
        checkpointer.close()
    return str(epath.Path(root) / ACTOR_DIR / str(step) / PARAMS_DIR)
