"""A run's identity: the tag naming its files and the settings
`run_<tag>.json` records (what produced its results), and which of two
records' settings differ. Reading and comparing runs needs neither the CLI
nor a model."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_collections

from gsm8k_jax import storage
from gsm8k_jax.checkpoints.lora_config import LORA_MODES, LoraConfig
from gsm8k_jax.eval.data import BUNDLED_TEST_SET
from gsm8k_jax.models.specs import model_spec

if TYPE_CHECKING:
    from gsm8k_jax.eval.runner import EvalConfig
    from gsm8k_jax.sampling.params import SamplingParams


# Sampling settings greedy decoding never reads: a greedy run records them
# as null (`without_greedy_unused`), and they never tell two greedy runs
# apart.
_GREEDY_UNUSED = ("seed", "top_k", "top_p")
_UNUSED_WHEN_GREEDY = tuple(f"eval.sampling.{name}" for name in _GREEDY_UNUSED)
# Settings recorded since a later version: an older record does not say
# what its run used (None), so a resume does not compare them, and a
# comparison pairs such a run with none that records them.
_SETTINGS_ADDED_LATER = ("mesh_model", "xla_gpu_autotune_level")
# How a LoRA run's model carries its checkpoint (LORA_MODES),
# or "custom": changed by a loader of the user's (`evaluate_checkpoints`'
# load_lora_fn), which `evaluate` cannot check.
RECORDED_LORA_MODES = (*LORA_MODES, "custom")


def with_later_settings(record: dict[str, Any]) -> dict[str, Any]:
    """A run record with the settings it predates as None (unknown)."""
    return dict.fromkeys(_SETTINGS_ADDED_LATER) | record


def differing_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted names of the settings that differ, e.g. `eval.sampling.seed`;
    where a run is greedy, not those greedy decoding never reads; between
    two base runs, not the LoRA settings; and not the paths of data or
    weights whose recorded digests are the same."""

    a, b = flat_settings(old), flat_settings(new)
    # A greedy run reads no seed, top_k or top_p: beside another greedy run
    # they never differ, and beside a sampled one the temperature says it.
    greedy = 0 in (
        a.get("eval.sampling.temperature"),
        b.get("eval.sampling.temperature"),
    )
    ignored = _UNUSED_WHEN_GREEDY if greedy else ()
    ignored += tuple(k for k in _SETTINGS_ADDED_LATER if k not in a or k not in b)
    if "gcs" in (a.get("data_sha256"), b.get("data_sha256")):
        ignored += ("data_sha256",)  # An older record: gs:// data unhashed.
    # Where the data and the weights were read from does not matter where
    # their contents are recorded the same (a moved clone, another HF cache).
    if a.get("data_sha256") == b.get("data_sha256") not in (None, "gcs"):
        ignored += ("data_path",)
    if a.get("model_revision") == b.get("model_revision") is not None:
        ignored += ("model_dir", "model.model_path")
    # A base run reads no LoRA: the rank and alpha its flags held do not
    # matter to it.
    base_runs = not a.get("lora_checkpoint") and not b.get("lora_checkpoint")
    return sorted(
        k
        for k in a.keys() | b.keys()
        if a.get(k) != b.get(k)
        and k not in ignored
        and not (base_runs and k.startswith("model.lora_config."))
    )


def flat_settings(record: Any, prefix: str = "") -> dict[str, Any]:
    """A run record's settings by dotted name: {"eval.batch_size": 32, ...}."""
    if not isinstance(record, dict):
        return {prefix: record}
    out = {}
    for key, value in record.items():
        out |= flat_settings(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def model_config(model_name: str) -> ml_collections.ConfigDict:
    """The `--model` config of a named model; configs/*.py files return this."""
    model_spec(model_name)
    return ml_collections.ConfigDict(
        {
            "model_family": "Gemma3",
            "model_name": model_name,
            "model_path": "",  # Empty: the model's default source (see specs.MODELS).
            "dtype": "bfloat16",
            "lora_config": dataclasses.asdict(LoraConfig()),
            "lora_checkpoint_path": "",
        }
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def checkpoint_tag(lora_path: str) -> str:
    """A short name for a LoRA checkpoint, e.g. `run-actor-500` for
    `.../run/actor/500/model_params`."""
    if not lora_path:
        return "base"
    parts = lora_path.rstrip("/").split("/")
    if parts[-1] == "model_params":
        parts = parts[:-1]
    return _slug("-".join(parts[-3:]))


def _file_digest(path: str) -> str:
    """The file's sha256 (16 hex digits), local or on gs://. (Records before
    2026-12-07 hold "gcs" for a file on gs://: it was not hashed.)"""
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()[:16]


def run_tag(
    model_name: str,
    lora_path: str,
    batch_size: int,
    lora_config: LoraConfig | None = None,
    task: str = "boxed",
    sampling: SamplingParams | None = None,
) -> str:
    """The tag naming a run's files:
    `<model>_<checkpoint>[_r<rank>a<alpha>][_<task>][_<sampling>]_bs<batch>`.

    `run_tag_of(run_info)` gives the same tag from a run record, which
    cannot disagree with what the record says.

    Args:
      model_name: a name from `specs.MODELS`.
      lora_path: the LoRA checkpoint, or "" for the base model; named by the
        step it designates, as the scripts name it (`<root>/actor` is its
        latest step).
      batch_size: prompts decoded in parallel.
      lora_config: the LoRA's rank and alpha, which change its answers, so
        two runs of one checkpoint with different alphas never share files.
        Those recorded beside the checkpoint (by our trainer) are used where
        there are any, as `run_info` records them.
      task: the `--task` preset; named unless it is the default `boxed`.
      sampling: a sampled run's settings are named (`_t0.8_n4_seed3`, with
        `p<top_p>` / `k<top_k>` after the temperature where set), so runs of
        other seeds or temperatures never share files; greedy runs (None,
        or temperature 0) name none.
    """
    if lora_path:  # Orbax is imported for LoRA runs alone.
        from gsm8k_jax.checkpoints.lora_checkpoint import (
            read_lora_config,
            resolve_lora_checkpoint,
        )

        lora_path = resolve_lora_checkpoint(lora_path)
        lora_config = read_lora_config(lora_path) or lora_config
    sampled = vars(sampling) if sampling is not None else None
    return _tag(model_name, lora_path, batch_size, lora_config, task, sampled)


def run_tag_of(run_info: Mapping[str, Any]) -> str:
    """The tag naming the files of the run `run_info` records: `run_tag`'s
    for the same run, read from the record alone."""
    lora_path = run_info["lora_checkpoint"]
    return _tag(
        run_info["model"]["model_name"],
        lora_path,
        run_info["eval"]["batch_size"],
        LoraConfig(**run_info["model"]["lora_config"]) if lora_path else None,
        run_info["eval"].get("task", "boxed"),
        run_info["eval"]["sampling"],
    )


def _tag(
    model_name: str,
    lora_path: str,
    batch_size: int,
    lora_config: LoraConfig | None,
    task: str,
    sampling: Mapping[str, Any] | None,
) -> str:
    adapter = f"_r{lora_config.rank}a{lora_config.alpha:g}" if lora_config else ""
    preset = "" if task == "boxed" else f"_{task}"
    return (
        f"{_slug(model_name)}_{checkpoint_tag(lora_path)}{adapter}{preset}"
        f"{_sampling_tag(sampling)}_bs{batch_size}"
    )


def _sampling_tag(sampling: Mapping[str, Any] | None) -> str:
    """`_t<temperature>[p<top_p>][k<top_k>]_n<samples>_seed<seed>` for a
    sampled run; "" for a greedy one."""
    if not sampling or not sampling["temperature"]:
        return ""
    part = f"_t{sampling['temperature']:g}"
    if sampling["top_p"] != 1:
        part += f"p{sampling['top_p']:g}"
    if sampling["top_k"]:
        part += f"k{sampling['top_k']}"
    return f"{part}_n{sampling['num_samples']}_seed{sampling['seed']}"


def run_info(
    model: Mapping[str, Any],
    *,
    model_dir: str | Path,
    lora_path: str = "",
    data_path: str | os.PathLike[str] | None = None,
    num_examples: int,
    eval_config: EvalConfig,
    mesh_model: int = 1,
    lora_mode: str = "attached",
) -> dict[str, Any]:
    """What produced a run's results, as `run_<tag>.json` records it.

    The answer extraction is not part of it: every run scores every method.

    Args:
      model: the `--model` config as a dict (`model_config(...).to_dict()`).
      model_dir: the local folder the weights were loaded from.
      lora_path: the LoRA checkpoint, or "" for the base model. Recorded as
        the step it designates (`<root>/actor` is its latest step), with the
        rank, alpha and module path the trainer recorded beside it (else
        `model`'s), as `load_lora` uses them: a run of another step is
        another run.
      data_path: the GSM8K file (local or gs://); None for the bundled test
        set.
      num_examples: how many problems are evaluated.
      eval_config: the evaluation settings.
      mesh_model: devices per tensor-parallel group (`--mesh_model`): it
        splits reductions, so it can change the last bits of a result.
      lora_mode: how the model carries the checkpoint, recorded with a
        lora_path alone: "attached" (`load_lora`'s default), "merged"
        (`load_lora(..., merge=True)`) or "qwix" (`apply_lora`), which
        `evaluate` checks against the model (`lora_mode(model)`), refusing
        a model that carries another or none; "custom" for weights changed
        some other way, which it cannot check.
    """
    from gsm8k_jax.checkpoints.sources import model_revision
    from gsm8k_jax.kernel_choice import recorded_autotune_level
    from gsm8k_jax.sampling import batching

    if lora_mode not in RECORDED_LORA_MODES:
        raise ValueError(
            f"lora_mode must be one of {RECORDED_LORA_MODES}, got {lora_mode!r}."
        )
    if lora_path:  # Orbax is imported for LoRA runs alone.
        from gsm8k_jax.checkpoints.lora_checkpoint import resolve_trained_lora

        trained = resolve_trained_lora(
            lora_path, LoraConfig(**model["lora_config"]), given=()
        )
        lora_path = trained.params_path
        model = {**model, "lora_config": dataclasses.asdict(trained.config)}
    data_path = os.fspath(BUNDLED_TEST_SET if data_path is None else data_path)
    return {
        "model": dict(model),
        "model_dir": str(model_dir),
        "model_revision": model_revision(model_dir),
        "lora_checkpoint": lora_path,
        "data_path": data_path,
        "data_sha256": _file_digest(data_path),
        "num_examples": num_examples,
        # Results are bitwise the same at any batch size for one row tile and
        # prefill group shape (the platform's), and a LoRA is attached
        # beside the weights (`lora.attach_lora`).
        "row_tile": eval_config.row_tile or batching.default_row_tile(),
        "prefill_chunk": batching.default_prefill_chunk(),
        # The platform's; a program runs at most row_tile of them.
        "prefill_rows": batching.default_prefill_rows(),
        "mesh_model": mesh_model,
        # On GPU, whether XLA timed kernels to choose them (`kernel_choice`):
        # runs that did may differ in the last bits.
        "xla_gpu_autotune_level": recorded_autotune_level(),
        "lora_mode": lora_mode if lora_path else None,
        # Every projection accumulates in float32 and rounds once. Records
        # without it were made otherwise (their bfloat16 results differ), so
        # they are neither resumed nor compared as the same settings.
        "projection_accumulation": "float32",
        "eval": eval_record(eval_config),
    }


def eval_record(eval_config: EvalConfig) -> dict[str, Any]:
    """The evaluation settings as a run record holds them (its "eval")."""
    return {
        "batch_size": eval_config.batch_size,
        "sampling": _sampling_record(eval_config.sampling),
        "prompt_template": eval_config.prompt_template,
        "system_prompt": eval_config.system_prompt,
        "use_chat_template": eval_config.use_chat_template,
        "task": eval_config.task,
    }


def _sampling_record(sampling: SamplingParams) -> dict[str, Any]:
    return without_greedy_unused({**vars(sampling), "eos_ids": list(sampling.eos_ids)})


def without_greedy_unused(sampling: dict[str, Any]) -> dict[str, Any]:
    """A run record's sampling settings, with those a greedy run never reads
    as null (older records hold the flags' values)."""
    if sampling["temperature"] == 0:
        return sampling | dict.fromkeys(_GREEDY_UNUSED)
    return sampling
