"""Command-line flags of the evaluation scripts, and the run they describe.

Model settings are an ml_collections config (`--model=configs/<model>.py`,
overridden field by field: `--model.model_name=gemma3-1b-it`,
`--model.lora_config.rank=16`); evaluation settings are plain absl flags.
Both evaluation scripts in research/script/ are thin wrappers over `main`.
Every script there runs its main through `run_main`: the project's flags in
--help, quiet logging, `gs://` storage checked first, and a user error or
Ctrl-C reported in one line.
"""

from __future__ import annotations

import atexit
import dataclasses
import difflib
import functools
import gc
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import jax
import ml_collections
from absl import app, flags, logging
from jax.sharding import Mesh
from ml_collections import config_flags
from tqdm import tqdm

from gsm8k_jax.checkpoints.sources import resolve_model_dir, start_model_revision
from gsm8k_jax.compilation_cache import (
    default_compilation_cache_dir,
    enable_compilation_cache,
)
from gsm8k_jax.eval import multihost
from gsm8k_jax.eval.data import BUNDLED_TEST_SET, load_gsm8k
from gsm8k_jax.eval.extraction import EXTRACTION_METHODS
from gsm8k_jax.eval.prompts import DEFAULT_PROMPT_TEMPLATE
from gsm8k_jax.eval.results import RunFiles, model_config, run_info, run_tag
from gsm8k_jax.eval.runner import EvalConfig, evaluate
from gsm8k_jax.eval.tasks import TASKS, task_eval_config
from gsm8k_jax.models.gemma3.params import load_config
from gsm8k_jax.models.gemma3.sharding import check_model_parallelism, make_mesh
from gsm8k_jax.models.registry import (
    MODELS,
    SUPPORTED_FAMILIES,
    default_eos_ids,
    load_pretrained,
    model_spec,
    parse_dtype,
    shape_warning,
)
from gsm8k_jax.quiet import quiet_logging
from gsm8k_jax.sampling.sampler import Sampler, SamplingParams
from gsm8k_jax.stop_signals import Terminated, stop_on_signals
from gsm8k_jax.storage import is_gcs, require_reachable, require_writable

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
    flags.DEFINE_integer("max_generation_steps", 768, "Most new tokens per answer.")
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
    flags.DEFINE_string(
        "compilation_cache_dir",
        str(default_compilation_cache_dir()),
        "JAX's persistent compilation cache: a rerun of the same settings skips"
        " compiling ('' = off).",
    )
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


def _parse_eos(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(
            f"--eos_tokens must be comma-separated integers, got {text!r}."
        ) from None


# Input and environment problems (ValueError: CheckpointError too;
# RuntimeError: SourceError, ResultsError, StorageError; OSError: missing or
# unreadable files) are reported as one line, not a traceback.
USER_ERRORS = (ValueError, RuntimeError, OSError)
# How shells report a command stopped by Ctrl-C (128 + SIGINT).
INTERRUPTED_EXIT_STATUS = 130


def _gcs_flag_values() -> list[str]:
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


def _expand_home() -> None:
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


def _list_in_help() -> None:
    """absl's --help lists the running script's key flags (--helpfull buries
    the rest among absl's own): the flags defined here become key flags of the
    script."""
    for flag in FLAGS.get_key_flags_for_module(__name__):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def _report(message: str) -> None:
    """Prints `message` to stderr on a line of its own, also when a progress
    bar was left open by the failure."""
    tqdm.write(message, file=sys.stderr)


def _stop(message: str, exit_status: int, reason: str | None = None) -> NoReturn:
    """Reports `message`, tells the other processes of a multi-host run that
    this one stops and why (`reason`, else `message`), and exits."""
    _report(message)
    multihost.post_stop(reason or message)
    sys.exit(exit_status)


def _what_survives(stop: BaseException, kept: str) -> str:
    """The account a stop exception carries, else `kept` and how to resume."""
    return str(stop) or f"{kept}; rerun the same command to resume"


def run_main(
    main_fn: Callable[[list[str]], Any], *, kept: str = "finished results are kept"
) -> None:
    """Runs `main_fn` under absl, after checking that any `gs://` flag's storage
    is reachable. A user error is one line (exit status 1); so is Ctrl-C, which
    says that rerunning resumes (`kept`: what survives the interruption), and
    so is SIGTERM (a preemption notice), which stops the work the same way
    and exits 0. `main_fn` may raise the stop signal's exception again with
    its own account of what survives, e.g. `KeyboardInterrupt("saved step
    4")`, which then replaces that sentence. In a multi-host run, a process
    that stops so tells the others, which stop too (`multihost`)."""
    _list_in_help()
    # At exit, spare the interpreter's last collection over every object
    # jax, flax and transformers made (about 0.5 s of each exit on CPU);
    # a caller that catches the SystemExit keeps collecting as before.
    atexit.register(gc.freeze)

    def _main(argv):
        quiet_logging()
        if len(argv) > 1:  # Else ignored: e.g. an output folder without its flag.
            _report(
                f"error: unexpected argument(s) {' '.join(argv[1:])}: every setting"
                " is a --flag=value (see --help)."
            )
            sys.exit(1)
        _expand_home()
        try:
            with stop_on_signals():
                for path in _gcs_flag_values():
                    require_reachable(path)
                main_fn(argv)
        except USER_ERRORS as e:
            _stop(f"error: {e}", 1)
        except KeyboardInterrupt as stop:
            survives = _what_survives(stop, kept)
            _stop(f"Interrupted: {survives}.", INTERRUPTED_EXIT_STATUS, "Ctrl-C")
        except Terminated as stop:
            survives = _what_survives(stop, kept)
            if heard := multihost.stop_heard():
                _stop(f"error: {heard}; this process stopped too: {survives}.", 1)
            _stop(f"Stopped by SIGTERM: {survives}.", 0, "SIGTERM")
        except Exception as e:  # A bug: its traceback follows.
            multihost.post_stop(f"{type(e).__name__}: {e}")
            raise

    app.run(_main, flags_parser=parse_flags)


def run_app(
    main_fn: Callable[[list[str]], Any], *, default_model_config: str | Path
) -> None:
    """Defines the evaluation flags, then runs `main_fn` (see `run_main`)."""
    define_flags(default_model_config)
    run_main(main_fn)


def run_script(*, lora: bool, default_model_config: str | Path) -> None:
    """Entry point of eval_gsm8k.py (lora=True) and eval_gsm8k_base.py."""
    run_app(
        functools.partial(main, lora=lora), default_model_config=default_model_config
    )


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
    parse_dtype(cfg.dtype)


def eval_config_from_flags(
    model_dir: Path, *, num_problems: int | None = None
) -> EvalConfig:
    """The evaluation settings of the flags; stop ids default to `model_dir`'s,
    and the batch is capped to the work (`num_problems` problems, if given)."""
    eos_ids = _parse_eos(FLAGS.eos_tokens) or default_eos_ids(model_dir)
    config = EvalConfig(
        batch_size=FLAGS.batch_size,
        row_tile=FLAGS.row_tile,
        sampling=SamplingParams(
            max_generation_steps=FLAGS.max_generation_steps,
            temperature=FLAGS.temperature,
            top_p=FLAGS.top_p,
            top_k=FLAGS.top_k,
            num_samples=FLAGS.num_samples,
            seed=FLAGS.seed,
            eos_ids=eos_ids,
        ),
        extraction_method=FLAGS.extraction_method,
        prompt_template=FLAGS.prompt_template,
        system_prompt=FLAGS.system_prompt or None,
        use_chat_template=FLAGS.use_chat_template,
    )
    config = task_eval_config(
        config,
        FLAGS.task,
        model_name=FLAGS.model.model_name,
        instruction_tuned=model_spec(FLAGS.model.model_name).instruction_tuned,
        given={name for name in FLAGS if FLAGS[name].present},
    )
    if num_problems is None:
        return config
    capped = config.for_problems(num_problems)
    if capped.batch_size != config.batch_size:
        print(
            f"note: --batch_size={config.batch_size} is more than the"
            f" {num_problems} problems; using {capped.batch_size}.",
            file=sys.stderr,
        )
    return capped


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


def check_eos_ids(eos_ids: tuple[int, ...], vocab_size: int, model_dir: Path) -> None:
    """Stop ids outside the vocabulary never match: every answer would run to
    the length limit."""
    outside = [e for e in eos_ids if not 0 <= e < vocab_size]
    if outside:
        raise ValueError(
            f"--eos_tokens {outside} are outside the model's vocabulary (0 to"
            f" {vocab_size - 1}); leave --eos_tokens out for the model's own stop ids"
            f" {list(default_eos_ids(model_dir))}."
        )


def local_mesh(model_parallel: int) -> Mesh | None:
    """A (data, model) mesh over this process's devices; None for one device."""
    devices = jax.local_devices()
    if len(devices) == 1 and model_parallel == 1:
        return None
    if model_parallel < 1 or len(devices) % model_parallel:
        raise ValueError(
            f"--mesh_model={model_parallel} must divide the {len(devices)} local"
            " devices."
        )
    return make_mesh(data=-1, model=model_parallel, devices=devices)


def start_jax() -> None:
    """JAX as the flags set it up: the persistent compilation cache, and
    `jax.distributed.initialize` with --distributed."""
    if FLAGS.compilation_cache_dir:
        require_writable(
            FLAGS.compilation_cache_dir,
            role="compilation cache folder",
            flag="--compilation_cache_dir (or '' for none)",
        )
    enable_compilation_cache(FLAGS.compilation_cache_dir)
    if FLAGS.distributed:
        multihost.initialize(
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            heartbeat_timeout_s=FLAGS.heartbeat_timeout_s,
        )


def main(argv: list[str], *, lora: bool) -> dict[str, Any] | None:
    """Runs one evaluation from the parsed flags; returns the summary (None
    on the processes other than 0 of a multi-host run)."""
    del argv
    require_writable(FLAGS.output_dir)  # Before any work.
    start_jax()
    cfg = FLAGS.model
    check_model_config(cfg)
    if lora and not cfg.lora_checkpoint_path:
        raise ValueError(
            "eval_gsm8k.py evaluates a LoRA checkpoint: pass --model.lora_checkpoint_path."
            " For the base model use eval_gsm8k_base.py."
        )
    if not lora and cfg.lora_checkpoint_path:
        raise ValueError(
            "eval_gsm8k_base.py evaluates the base model and takes no"
            " --model.lora_checkpoint_path; use eval_gsm8k.py for LoRA checkpoints."
        )
    data_path = FLAGS.data_path or str(BUNDLED_TEST_SET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples = load_gsm8k(data_path, FLAGS.num_examples)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    lora_config, lora_path = None, ""
    if lora:
        from gsm8k_jax.checkpoints import lora as lora_lib
        from gsm8k_jax.checkpoints import lora_checkpoint

        given = given_lora_fields(sys.argv)
        trained = lora_checkpoint.resolve_trained_lora(
            cfg.lora_checkpoint_path,
            lora_lib.LoraConfig(**cfg.lora_config.to_dict()),
            given=given,
        )
        lora_path, lora_config = trained.params_path, trained.config
        if not trained.recorded:
            values = ", ".join(
                f"{field} {getattr(lora_config, field)}"
                f" ({'given' if field in given else 'default'})"
                for field in ("rank", "alpha")
            )
            print(
                f"LoRA: {values}; the checkpoint records neither, so they must be"
                " the training run's.",
                flush=True,
            )
        cfg.lora_config.update(dataclasses.asdict(lora_config))

    model_dir = resolve_model_dir(
        cfg.model_path or model_spec(cfg.model_name).default_path
    )
    weights_config = load_config(model_dir)
    check_model_parallelism(weights_config.num_heads, FLAGS.mesh_model)
    if warning := shape_warning(cfg.model_name, weights_config, model_dir):
        print(f"warning: {warning}", file=sys.stderr)
    mesh = local_mesh(FLAGS.mesh_model)
    eval_config = eval_config_from_flags(model_dir, num_problems=len(examples))
    tag = run_tag(
        cfg.model_name, lora_path, eval_config.batch_size, lora_config, eval_config.task
    )
    # The run record hashes the weights (model_revision): in the background,
    # while they load, unless a resumed run needs it now to compare.
    start_model_revision(model_dir)
    run_record = functools.partial(
        run_info,
        cfg.to_dict(),
        model_dir=model_dir,
        lora_path=lora_path,
        data_path=data_path,
        num_examples=len(examples),
        eval_config=eval_config,
    )
    process, num_processes = jax.process_index(), jax.process_count()
    files = RunFiles(FLAGS.output_dir, tag, process_index=process)
    files.check(run_record, resume=FLAGS.resume, overwrite=FLAGS.overwrite)
    print(f"Run tag: {tag}", flush=True)

    model, tokenizer, _ = load_pretrained(
        cfg.model_name, model_dir, dtype=cfg.dtype, mesh=mesh
    )
    check_eos_ids(eval_config.sampling.eos_ids, model.config.vocab_size, model_dir)
    if lora:
        lora_lib.load_trained_lora(model, trained, merge=True)
    sampler = Sampler(model, tokenizer, mesh=mesh, row_tile=eval_config.row_tile)
    # Recorded only now that model, data and checkpoint have loaded.
    info = run_record()
    if process == 0:
        files.prepare(info, resume=FLAGS.resume, overwrite=FLAGS.overwrite)
    if num_processes > 1:  # No process commits before process 0 prepared.
        multihost.wait_for_all_processes(
            "the start of generation", FLAGS.barrier_timeout_s
        )
    print(
        f"Results: {files.rollouts_path} once the run finishes (finished problems"
        " are committed as they finish).",
        flush=True,
    )
    summary = evaluate(
        sampler,
        examples,
        eval_config,
        files,
        run_info=info,
        num_processes=num_processes,
    )
    if summary is None:
        print(
            f"Process {process}: its share is committed; process 0 writes the results."
        )
        return None
    low, high = summary["accuracy_ci95"]
    print(
        f"{tag}: {summary['correct']}/{summary['total']} correct ="
        f" {summary['accuracy']:.2%} (95% CI {low:.2%}-{high:.2%}),"
        f" {summary['extraction_failures']} without an answer, {summary['truncations']}"
        f" truncated. Summary: {files.summary_path}"
    )
    logging.info("Finished %s", tag)
    return summary
