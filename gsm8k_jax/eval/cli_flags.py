"""The evaluation scripts' flags: defined and parsed (a bad flag or `--model`
field is one line, not a traceback). This module imports neither jax nor
transformers, so --help and a flag error answer at once; `cli` reads the
parsed flags into the run's settings.

Model settings are an ml_collections config (`--model=configs/<model>.py`,
overridden field by field: `--model.model_name=gemma3-1b-it`,
`--model.lora_config.rank=16`); evaluation settings are plain absl flags.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import ml_collections
from absl import flags
from ml_collections import config_flags

from gsm8k_jax.compilation_cache import default_compilation_cache_dir
from gsm8k_jax.eval import multihost
from gsm8k_jax.eval.data import BUNDLED_TEST_SET
from gsm8k_jax.eval.extraction import EXTRACTION_METHODS
from gsm8k_jax.eval.prompts import DEFAULT_PROMPT_TEMPLATE
from gsm8k_jax.eval.run_record import model_config
from gsm8k_jax.eval.tasks import TASKS
from gsm8k_jax.models.specs import MODELS, SUPPORTED_FAMILIES, check_dtype
from gsm8k_jax.storage import is_gcs

FLAGS = flags.FLAGS


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level, keys dotted (`lora_config.rank`)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def model_fields() -> list[str]:
    """The `--model.<field>` names, nested ones dotted (`lora_config.rank`)."""
    return list(_flatten(model_config("gemma3-tiny").to_dict()))


def _flags_error(message: str) -> NoReturn:
    """One line (absl's own messages may carry a prefix and line breaks)."""
    line = " ".join(message.removeprefix("ERROR:: ").split())
    print(f"FATAL Flags parsing error: {line}", file=sys.stderr)
    sys.exit(1)


def _model_field_error(error: Exception, argv: Sequence[str]) -> str:
    """One line naming the first unknown `--model.<field>` in `argv` and the
    nearest known one (ml_collections' own message spans lines, quoted)."""
    fields = model_fields()
    for name in sorted(given_model_fields(argv)):
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"; did you mean --model.{close[0]}?" if close else "."
            return (
                f"unknown --model field --model.{name}{hint}"
                f" Known fields: {', '.join(fields)}."
            )
    return " ".join(str(error.args[0] if error.args else error).split())


def define_model_flag(default_model_config: str | Path) -> None:
    """`--model`, a config file whose fields `--model.<field>=` overrides; a
    misspelt field, or a `--flagfile` that cannot be read, is a one-line
    flag error (ml_collections reads the command line, flag files included,
    while defining the flag)."""
    try:
        config_flags.DEFINE_config_file(
            "model",
            str(default_model_config),
            "Model config file (configs/*.py); override a field with"
            f" --model.<field>=<value>. Fields: {', '.join(model_fields())}.",
        )
    except (AttributeError, KeyError) as e:
        _flags_error(_model_field_error(e, sys.argv))
    except flags.Error as e:
        _flags_error(str(e))


def define_compilation_cache_flag() -> None:
    """--compilation_cache_dir, for every script that compiles programs."""
    flags.DEFINE_string(
        "compilation_cache_dir",
        str(default_compilation_cache_dir()),
        "JAX's persistent compilation cache: a rerun of the same settings skips"
        " compiling ('' = off).",
    )


def define_flags(default_model_config: str | Path) -> None:
    """The evaluation scripts' flags: `--model` and the evaluation settings."""
    define_model_flag(default_model_config)
    flags.DEFINE_integer(
        "batch_size", 32, "Prompts decoded in parallel (x num_samples rows)."
    )
    flags.DEFINE_integer(
        "row_tile",
        None,
        "Slots per decode program; default the platform's (32 on CPU, 128 on GPU,"
        " 256 on TPU). Answers are bitwise the same at any --batch_size for one"
        " row tile, not across tiles (it is recorded in the run). A tile no"
        " bigger than --batch_size computes no empty rows (CPU, small batches).",
        lower_bound=1,
    )
    flags.DEFINE_string(
        "output_dir",
        "results",
        "Folder for the run's files: a local folder or gs://bucket/folder.",
    )
    flags.DEFINE_integer(
        "max_generation_steps",
        768,
        "Most new tokens per answer (default 768; 256 for the lm-eval --task presets).",
    )
    flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
    flags.DEFINE_integer("top_k", 0, "Top-k sampling (0 = off).")
    flags.DEFINE_integer("num_samples", 1, "Samples per question (pass@k, maj@k).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_string(
        "eos_tokens",
        "",
        "Comma-separated stop ids; default from generation_config.json.",
    )
    flags.DEFINE_enum(
        "extraction_method", "strict", list(EXTRACTION_METHODS), "Answer extraction."
    )
    flags.DEFINE_enum(
        "task",
        None,
        list(TASKS),
        "Preset of prompt, stop strings, length and lm-eval scores: boxed (default"
        " for instruction-tuned models), lm-eval's gsm8k (default for pretrained"
        " ones), gsm8k_cot, gsm8k_cot_zeroshot, each also as <name>_chat.",
    )
    flags.DEFINE_integer("num_examples", None, "Evaluate only the first N problems.")
    flags.DEFINE_string(
        "data_path",
        "",
        f"GSM8K JSONL (local or gs://); default {BUNDLED_TEST_SET.name} bundled.",
    )
    flags.DEFINE_string("system_prompt", "", "Optional system turn.")
    flags.DEFINE_string(
        "prompt_template",
        DEFAULT_PROMPT_TEMPLATE,
        "User turn; must contain {question}.",
    )
    flags.DEFINE_bool(
        "use_chat_template", True, "Wrap prompts in the tokenizer's chat template."
    )
    flags.DEFINE_bool("resume", True, "Continue a run found in --output_dir.")
    flags.DEFINE_bool("overwrite", False, "Replace a run found in --output_dir.")
    flags.DEFINE_integer(
        "mesh_model", 1, "Devices per tensor-parallel group; the rest split the batch."
    )
    define_compilation_cache_flag()
    flags.DEFINE_bool(
        "distributed",
        False,
        "Multi-host: jax.distributed.initialize(); each process evaluates its share"
        " and process 0 merges the results (--output_dir must be storage all"
        " processes share, e.g. gs://).",
    )
    flags.DEFINE_string(
        "coordinator_address", None, "jax.distributed coordinator host:port."
    )
    flags.DEFINE_integer("num_processes", None, "jax.distributed process count.")
    flags.DEFINE_integer("process_id", None, "jax.distributed process id.")
    flags.DEFINE_integer(
        "heartbeat_timeout_s",
        multihost.DEFAULT_HEARTBEAT_TIMEOUT_S,
        "jax.distributed: a process that sends no heartbeat for this many"
        " seconds counts as dead, and the others abort.",
        lower_bound=1,
    )
    flags.DEFINE_integer(
        "barrier_timeout_s",
        multihost.DEFAULT_BARRIER_TIMEOUT_S,
        "Multi-host: how long processes wait for each other to load the model"
        " and data before generating.",
        lower_bound=1,
    )


def _check_model_file() -> None:
    """ml_collections defers a `--model` file's load error to the config's first
    use, as a traceback; raises it as a flag error instead."""
    if "model" not in FLAGS:
        return
    try:
        FLAGS.model.get("model_name")
    except OSError as e:
        reason = str(e.__cause__ or e).strip().splitlines()[-1].strip()
        raise flags.Error(
            f"--model={FLAGS['model'].config_filename}: cannot load this config"
            f" file ({reason}); pass one of configs/*.py."
        ) from None


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing; a bad flag or --model field is one line, not a traceback."""
    try:
        rest = FLAGS(argv)
        _check_model_file()
        return rest
    except (AttributeError, KeyError) as e:
        _flags_error(_model_field_error(e, argv))
    except flags.Error as e:
        _flags_error(str(e))


def check_model_config(cfg: ml_collections.ConfigDict) -> None:
    """Rejects an unsupported `--model` family, name or dtype with a clear error."""
    if cfg.model_family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"--model.model_family={cfg.model_family!r}; supported: {SUPPORTED_FAMILIES}."
        )
    if cfg.model_name not in MODELS:
        raise ValueError(
            f"--model.model_name={cfg.model_name!r}; choose one of {sorted(MODELS)}"
            " (a folder or gs:// path goes in --model.model_path)."
        )
    check_dtype(cfg.dtype)


def given_model_fields(argv: Sequence[str]) -> set[str]:
    """The `--model.<field>` flags given on the command line (or in a
    `--flagfile` it names), by field (`dtype`, `lora_config.rank`)."""
    argv = FLAGS.read_flags_from_files(list(argv), force_gnu=True)
    names = (arg.lstrip("-").split("=", 1)[0] for arg in argv[1:] if arg[:1] == "-")
    return {name.removeprefix("model.") for name in names if name.startswith("model.")}


def given_lora_fields(argv: Sequence[str]) -> set[str]:
    """The `--model.lora_config.<field>` flags given on the command line."""
    prefix = "lora_config."
    return {
        f.removeprefix(prefix) for f in given_model_fields(argv) if f.startswith(prefix)
    }


def gcs_flag_values() -> list[str]:
    """The `gs://` paths among the flags' values, `--model`'s fields and list
    flags' items included."""
    values = []
    for value in FLAGS.flag_values_dict().values():
        if isinstance(value, ml_collections.ConfigDict):
            values += _flatten(value.to_dict()).values()
        elif isinstance(value, list):
            values += value
        else:
            values.append(value)
    return [v for v in values if isinstance(v, str) and is_gcs(v)]


def _home(value):
    """`~/x` as the user meant it: the shell leaves a `~` after `=` as it is."""
    if isinstance(value, str) and (value == "~" or value.startswith("~/")):
        return os.path.expanduser(value)
    return value


def expand_home() -> None:
    """Expands a leading `~/` in every flag's value, `--model`'s fields and
    list flags' items included (`--output_dir=~/runs` made a folder `~`)."""
    for name, value in FLAGS.flag_values_dict().items():
        if isinstance(value, ml_collections.ConfigDict):
            for field, item in value.items():
                value[field] = _home(item)
        elif isinstance(value, list):
            FLAGS[name].value = [_home(item) for item in value]
        elif _home(value) != value:
            FLAGS[name].value = _home(value)


def list_in_help() -> None:
    """absl's --help lists the running script's key flags (--helpfull buries
    the rest among absl's own): the flags defined here become key flags of the
    script."""
    for flag in FLAGS.get_key_flags_for_module(__name__):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
