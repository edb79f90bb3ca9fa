"""The evaluation run the scripts describe: eval_gsm8k.py and
eval_gsm8k_base.py define their flags and run through
`script_main.run_eval_script`, which imports this module only once the
flags have parsed. `main` reads the flags into settings, loads the model,
data and checkpoint, and evaluates (`runner.evaluate`)."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
from absl import logging
from jax.sharding import Mesh

from gsm8k_jax.checkpoints.sources import resolve_model_dir, start_model_revision
from gsm8k_jax.compilation_cache import enable_compilation_cache
from gsm8k_jax.eval import multihost
from gsm8k_jax.eval.cli_flags import FLAGS, check_model_config, given_lora_fields
from gsm8k_jax.eval.data import BUNDLED_TEST_SET, load_gsm8k
from gsm8k_jax.eval.results import RunFiles
from gsm8k_jax.eval.run_record import run_info, run_tag
from gsm8k_jax.eval.runner import EvalConfig, check_generation_limit, evaluate
from gsm8k_jax.eval.tasks import get_task, task_eval_config, trained_lora_warnings
from gsm8k_jax.kernel_choice import fix_gpu_kernels
from gsm8k_jax.models.gemma3.params import load_config
from gsm8k_jax.models.gemma3.sharding import check_model_parallelism, make_mesh
from gsm8k_jax.models.registry import default_eos_ids, load_pretrained, shape_warning
from gsm8k_jax.models.specs import model_spec
from gsm8k_jax.sampling.params import SamplingParams
from gsm8k_jax.sampling.sampler import Sampler
from gsm8k_jax.storage import require_writable


def _parse_eos(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(
            f"--eos_tokens must be comma-separated integers, got {text!r}."
        ) from None


def eval_config_from_flags(model_dir: Path) -> EvalConfig:
    """The evaluation settings of the flags; stop ids default to `model_dir`'s."""
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
    sampling = config.sampling
    unused = [
        f"--{name}={getattr(sampling, name)}"
        for name, off in (("top_p", 1.0), ("top_k", 0))
        if getattr(sampling, name) != off
    ]
    if sampling.temperature == 0 and unused:
        print(
            f"note: {' and '.join(unused)} {'has' if len(unused) == 1 else 'have'}"
            " no effect at --temperature=0 (greedy decoding); set a temperature"
            " > 0 to sample.",
            file=sys.stderr,
        )
    return config


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


def start_compilation_cache() -> None:
    """The persistent compilation cache --compilation_cache_dir names, checked
    writable first."""
    if FLAGS.compilation_cache_dir:
        require_writable(
            FLAGS.compilation_cache_dir,
            role="compilation cache folder",
            flag="--compilation_cache_dir (or '' for none)",
        )
    enable_compilation_cache(FLAGS.compilation_cache_dir)


def start_jax() -> None:
    """JAX as the flags set it up: the same GPU kernels in every compilation
    (`kernel_choice`), the persistent compilation cache, and
    `jax.distributed.initialize` with --distributed."""
    fix_gpu_kernels()
    start_compilation_cache()
    if FLAGS.distributed:
        try:
            multihost.initialize(
                FLAGS.coordinator_address,
                FLAGS.num_processes,
                FLAGS.process_id,
                heartbeat_timeout_s=FLAGS.heartbeat_timeout_s,
            )
        except ValueError as e:
            if FLAGS.coordinator_address:
                raise
            # No coordinator given, and no cluster JAX can detect.
            raise ValueError(
                f"--distributed: {e} Pass --coordinator_address=<host:port of"
                " process 0>, --num_processes and --process_id, or run where"
                " JAX detects the cluster (Cloud TPU, SLURM, Open MPI)."
            ) from e


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
    eval_config = eval_config_from_flags(model_dir)
    check_generation_limit(eval_config, weights_config, model_dir)
    if lora:  # Its factors' shapes, before the weights load.
        lora_lib.check_trained_loras(weights_config, [trained])
    tag = run_tag(
        cfg.model_name,
        lora_path,
        eval_config.batch_size,
        lora_config,
        eval_config.task,
        eval_config.sampling,
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
        mesh_model=FLAGS.mesh_model,
    )
    process, num_processes = jax.process_index(), jax.process_count()
    files = RunFiles(FLAGS.output_dir, tag, process_index=process)
    atexit.register(files.release)  # Also where the run fails before it starts.
    files.check(run_record, resume=FLAGS.resume, overwrite=FLAGS.overwrite)
    print(f"Run tag: {tag}", flush=True)

    model, tokenizer, _ = load_pretrained(
        cfg.model_name, model_dir, dtype=cfg.dtype, mesh=mesh
    )
    check_eos_ids(eval_config.sampling.eos_ids, model.config.vocab_size, model_dir)
    if lora:
        lora_lib.load_trained_lora(model, trained)
    sampler = Sampler(model, tokenizer, mesh=mesh, row_tile=eval_config.row_tile)
    # Recorded only now that model, data and checkpoint have loaded.
    info = run_record()
    if lora:
        revision = info["model_revision"]
        for warning in trained_lora_warnings(trained, revision, model_dir, eval_config):
            print(f"warning: {warning}", file=sys.stderr)
    if process == 0:
        if FLAGS.overwrite and files.has_results():
            print(
                f"--overwrite: removing the results of run '{tag}' in"
                f" {FLAGS.output_dir} and evaluating it again.",
                file=sys.stderr,
                flush=True,
            )
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
    print(summary_line(summary, files.summary_path))
    logging.info("Finished %s", tag)
    return summary


def summary_line(summary: dict[str, Any], path: str) -> str:
    """A finished run in one line: its accuracy with its interval; pass@k and
    maj@k where it drew several samples; lm-eval's own scores for its tasks."""
    low, high = summary["accuracy_ci95"]
    interval = f"95% CI {low:.2%}-{high:.2%}"
    if summary["accuracy_ci95_method"] == "clustered":
        interval += ", clustered by problem"
    correct = f"{summary['correct']}/{summary['total']} correct"
    figures = [f"{correct} = {summary['accuracy']:.2%} ({interval})"]
    k = summary["run"]["eval"]["sampling"]["num_samples"]
    if k > 1:
        figures.append(
            f"pass@{k} {summary[f'pass@{k}']:.2%}, maj@{k} {summary[f'maj@{k}']:.2%}"
        )
    if lm_eval := summary.get("lm_eval"):
        filters = [name for name, _ in get_task(summary["run"]["eval"]["task"]).filters]
        scores = (f"{n} {lm_eval[f'exact_match,{n}']:.2%}" for n in filters)
        figures.append(f"lm-eval exact_match {', '.join(scores)}")
    return (
        f"{summary['tag']}: {'; '.join(figures)}; {summary['extraction_failures']}"
        f" without an answer, {summary['truncations']} truncated. Summary: {path}"
    )
