"""Command-line flags of the evaluation scripts, and the run they describe.

Model settings are an ml_collections config (`--model=configs/<model>.py`,
overridden field by field: `--model.model_name=gemma3-1b-it`,
`--model.lora_config.rank=16`); evaluation settings are plain absl flags.
Both scripts in research/script/ are thin wrappers over `main`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from jax.sharding import Mesh
from ml_collections import config_flags

from gsm8k_jax.checkpoints.sources import resolve_model_dir
from gsm8k_jax.eval.data import BUNDLED_TEST_SET, load_gsm8k
from gsm8k_jax.eval.extraction import EXTRACTION_METHODS
from gsm8k_jax.eval.prompts import DEFAULT_PROMPT_TEMPLATE
from gsm8k_jax.eval.results import RunFiles, model_config, run_info, run_tag
from gsm8k_jax.eval.runner import EvalConfig, evaluate, merge_shards, shard_tag
from gsm8k_jax.models.gemma3.sharding import make_mesh
from gsm8k_jax.models.registry import (
    MODELS,
    SUPPORTED_FAMILIES,
    default_eos_ids,
    load_pretrained,
    model_spec,
    parse_dtype,
)
from gsm8k_jax.sampling.sampler import Sampler, SamplingParams

FLAGS = flags.FLAGS


def define_flags(default_model_config: str | Path) -> None:
    config_flags.DEFINE_config_file(
        "model", str(default_model_config), "Model config file; fields overridable."
    )
    flags.DEFINE_integer(
        "batch_size", 32, "Prompts decoded in parallel (x num_samples rows)."
    )
    flags.DEFINE_string(
        "output_dir", "results", "Folder for rollouts and summary files."
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
    flags.DEFINE_bool(
        "distributed",
        False,
        "Multi-host: jax.distributed.initialize(); each process evaluates its share"
        " and process 0 merges the shards (--output_dir must be shared storage).",
    )
    flags.DEFINE_string(
        "coordinator_address", None, "jax.distributed coordinator host:port."
    )
    flags.DEFINE_integer("num_processes", None, "jax.distributed process count.")
    flags.DEFINE_integer("process_id", None, "jax.distributed process id.")


def _exit_on_unknown_model_field(error: Exception) -> None:
    known = ", ".join(sorted(model_config("gemma3-tiny").keys()))
    print(
        f"FATAL Flags parsing error: unknown --model field {error}. Known fields: {known}"
        " (lora_config has rank, alpha, module_path).",
        file=sys.stderr,
    )
    sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, with a flag error (not a traceback) for bad --model.* keys."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError) as e:
        _exit_on_unknown_model_field(e)
    except flags.Error as e:
        print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
        sys.exit(1)


def _parse_eos(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(
            f"--eos_tokens must be comma-separated integers, got {text!r}."
        ) from None


# Input problems reported as one clear line, not a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError)


def run_app(
    main_fn: Callable[[list[str]], Any], *, default_model_config: str | Path
) -> None:
    """Defines the flags, then runs `main_fn` under absl; user errors are
    reported as one line (exit status 1), not a traceback."""
    try:  # ml_collections applies --model.* overrides while defining the flag.
        define_flags(default_model_config)
    except (AttributeError, KeyError) as e:
        _exit_on_unknown_model_field(e)

    def _main(argv):
        try:
            main_fn(argv)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    app.run(_main, flags_parser=parse_flags)


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
            f"--model.model_name={cfg.model_name!r}; choose one of {sorted(MODELS)}."
        )
    parse_dtype(cfg.dtype)


def eval_config_from_flags(
    model_dir: Path, *, num_problems: int | None = None
) -> EvalConfig:
    """The evaluation settings of the flags; stop ids default to `model_dir`'s,
    and the batch is capped to the work (`num_problems` problems, if given)."""
    eos_ids = _parse_eos(FLAGS.eos_tokens) or default_eos_ids(model_dir)
    batch_size = FLAGS.batch_size
    if num_problems is not None and batch_size > num_problems:
        batch_size = max(num_problems, 1)
        print(
            f"note: --batch_size={FLAGS.batch_size} is more than the"
            f" {num_problems} problems; using {batch_size}.",
            file=sys.stderr,
        )
    return EvalConfig(
        batch_size=batch_size,
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


def given_lora_fields(argv: list[str]) -> set[str]:
    """The `--model.lora_config.<field>` flags given on the command line."""
    prefix = "--model.lora_config."
    return {a[len(prefix) :].split("=")[0] for a in argv if a.startswith(prefix)}


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
    return make_mesh(data=-1, model=model_parallel, devices=devices)


def main(argv: list[str], *, lora: bool) -> dict[str, Any]:
    """Runs one evaluation from the parsed flags; returns the summary."""
    del argv
    if FLAGS.distributed:
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
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

        lora_path = lora_lib.resolve_lora_checkpoint(cfg.lora_checkpoint_path)
        recorded = lora_lib.read_lora_config(lora_path)
        lora_config = lora_lib.effective_lora_config(
            lora_lib.LoraConfig(**cfg.lora_config.to_dict()),
            recorded,
            given=given_lora_fields(sys.argv),
            where=lora_path,
        )
        if recorded is None:
            print(
                f"LoRA: rank {lora_config.rank}, alpha {lora_config.alpha} from the"
                " flags (the checkpoint records neither: they must be the training"
                " run's).",
                flush=True,
            )
        cfg.lora_config.update(dataclasses.asdict(lora_config))

    model_dir = resolve_model_dir(
        cfg.model_path or model_spec(cfg.model_name).default_path
    )
    eval_config = eval_config_from_flags(model_dir, num_problems=len(examples))
    tag = run_tag(cfg.model_name, lora_path, eval_config.batch_size, lora_config)
    info = run_info(
        cfg.to_dict(),
        model_dir=model_dir,
        lora_path=lora_path,
        data_path=data_path,
        num_examples=len(examples),
        eval_config=eval_config,
    )
    shard_index, num_shards = jax.process_index(), jax.process_count()
    shard = shard_tag(tag, shard_index, num_shards) if num_shards > 1 else tag
    files = RunFiles(FLAGS.output_dir, shard)
    files.check(info, resume=FLAGS.resume, overwrite=FLAGS.overwrite)
    print(f"Run tag: {shard}", flush=True)

    model, tokenizer, _ = load_pretrained(cfg.model_name, model_dir, dtype=cfg.dtype)
    check_eos_ids(eval_config.sampling.eos_ids, model.config.vocab_size, model_dir)
    if lora:
        lora_lib.load_lora(model, lora_path, lora_config, merge=True)
    sampler = Sampler(model, tokenizer, mesh=local_mesh(FLAGS.mesh_model))
    # Recorded only now that model, data and checkpoint have loaded.
    files.prepare(info, resume=FLAGS.resume, overwrite=FLAGS.overwrite)
    print(f"Results: {files.rollouts_path}", flush=True)
    summary = evaluate(
        sampler,
        examples,
        eval_config,
        files,
        run_info=info,
        shard_index=shard_index,
        num_shards=num_shards,
    )
    if num_shards > 1:
        if shard_index != 0:
            return summary
        files = RunFiles(FLAGS.output_dir, tag)
        summary = merge_shards(FLAGS.output_dir, tag, num_shards, eval_config, info)
    low, high = summary["accuracy_ci95"]
    print(
        f"{tag}: {summary['correct']}/{summary['total']} correct ="
        f" {summary['accuracy']:.2%} (95% CI {low:.2%}-{high:.2%}),"
        f" {summary['extraction_failures']} without an answer, {summary['truncations']}"
        f" truncated. Summary: {files.summary_path}"
    )
    logging.info("Finished %s", tag)
    return summary
