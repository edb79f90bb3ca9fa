"""Evaluating a base model and a list of its LoRA checkpoints in one process.

`evaluate_checkpoints` loads the base weights once per device group and
writes each run's files exactly as `eval_gsm8k.py` / `eval_gsm8k_base.py`
would, so that `runs.load_runs` and `comparison.compare_runs` read them like
any other run. The local devices can be split into groups that evaluate
different checkpoints side by side, one thread each (JAX dispatch releases
the GIL); each group has its own mesh, model copy and sampler. Rows are
bitwise the same whichever group evaluates them and however many data
devices it has (the sampler is batch invariant and data parallelism keeps
every row's arithmetic). Unlike the reading and comparing modules, this one
needs jax and the model.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

import jax
from absl import logging
from flax import nnx

from gsm8k_jax import stop_signals, storage
from gsm8k_jax.checkpoints.sources import resolve_model_dir
from gsm8k_jax.eval.data import BUNDLED_TEST_SET, GSM8KExample, load_gsm8k
from gsm8k_jax.eval.results import ResultsError, RunFiles
from gsm8k_jax.eval.run_record import model_config, run_info, run_tag_of
from gsm8k_jax.eval.runner import EvalConfig, check_generation_limit, evaluate
from gsm8k_jax.eval.runs import RunResult, load_run_files
from gsm8k_jax.eval.tasks import trained_lora_warnings
from gsm8k_jax.models.gemma3.model import Gemma3
from gsm8k_jax.models.gemma3.params import load_config
from gsm8k_jax.models.gemma3.sharding import check_model_parallelism, make_mesh
from gsm8k_jax.models.registry import load_pretrained, shape_warning
from gsm8k_jax.models.specs import model_spec
from gsm8k_jax.sampling.sampler import Sampler

if TYPE_CHECKING:
    from gsm8k_jax.checkpoints.lora import LoraConfig

__all__ = ["LoadLoraFn", "device_groups", "evaluate_checkpoints"]

# `load_lora(model, path, config)`: attaches a checkpoint to `model` in
# place (see `gsm8k_jax.checkpoints.lora.load_lora`).
LoadLoraFn = Callable[..., Gemma3]
# (resolved LoRA path, "" for the base model; its files; its run record).
_Run = tuple[str, RunFiles, dict[str, Any]]
# How often process 0 of a multi-host sweep looks for the others' runs.
RUN_POLL_S = 2.0


def device_groups(
    devices: Sequence[jax.Device], devices_per_checkpoint: int, mesh_model: int
) -> list[list[jax.Device]]:
    """`devices` in consecutive groups of `devices_per_checkpoint` (0: one
    group of all), each split into a (data, `mesh_model`) mesh."""
    per_group = devices_per_checkpoint or len(devices)
    if not 1 <= per_group <= len(devices) or len(devices) % per_group:
        raise ValueError(
            f"--devices_per_checkpoint={devices_per_checkpoint} must divide the"
            f" {len(devices)} local devices (0: all of them for each checkpoint"
            " in turn)."
        )
    if per_group % mesh_model:
        raise ValueError(
            f"--mesh_model={mesh_model} must divide the {per_group} devices of each"
            " checkpoint (--devices_per_checkpoint)."
        )
    return [list(devices[i : i + per_group]) for i in range(0, len(devices), per_group)]


@dataclasses.dataclass(frozen=True)
class _Sweep:
    """What every device group of a sweep shares."""

    model_name: str
    model_dir: os.PathLike
    dtype: str
    # Each checkpoint's rank, alpha and module_path, by resolved path.
    lora_configs: dict[str, LoraConfig]
    eval_config: EvalConfig
    examples: Sequence[GSM8KExample]
    show_progress: bool
    load_lora_fn: LoadLoraFn
    mesh_model: int


def _evaluate_on(
    devices: list[jax.Device],
    sweep: _Sweep,
    work: queue.SimpleQueue[tuple[int, _Run]],
    results: dict[int, RunResult],
    stop: threading.Event,
) -> None:
    """Loads the base model onto `devices` and evaluates runs from `work`
    until it is empty (or another group failed)."""
    mesh = None
    if len(devices) > 1 or sweep.mesh_model > 1:
        mesh = make_mesh(model=sweep.mesh_model, devices=devices)
    with jax.default_device(devices[0]):
        model, tokenizer, _ = load_pretrained(
            sweep.model_name, sweep.model_dir, dtype=sweep.dtype, mesh=mesh
        )
        # One Sampler per structure of the model (the base model; with a
        # LoRA attached, or merged), each compiled once for all the runs it
        # serves.
        samplers: dict[nnx.GraphDef, Sampler] = {}
        detach_lora = None
        if sweep.lora_configs:  # qwix, orbax: imported for LoRA runs alone.
            from gsm8k_jax.checkpoints.lora import detach_lora
        # New Variables holding the base arrays: merging replaces a
        # Variable's array and marks it merged (`lora_state.MERGED`), so
        # these stay the base weights, and putting them back clears the mark.
        base_params = jax.tree.map(lambda x: x, nnx.state(model, nnx.Param))
        while not stop.is_set():
            try:
                index, (lora_path, files, info) = work.get_nowait()
            except queue.Empty:
                return
            nnx.update(model, base_params)
            if detach_lora is not None:
                detach_lora(model)
            if sweep.show_progress:
                print(f"Run tag: {files.tag}", file=sys.stderr, flush=True)
            if lora_path:
                logging.info("Attaching %s to the base model.", lora_path)
                sweep.load_lora_fn(model, lora_path, sweep.lora_configs[lora_path])
            structure = nnx.graphdef(model)
            if structure not in samplers:
                samplers[structure] = Sampler(
                    model, tokenizer, mesh=mesh, row_tile=sweep.eval_config.row_tile
                )
            sampler = samplers[structure]
            evaluate(
                sampler,
                sweep.examples,
                sweep.eval_config,
                files,
                run_info=info,
                show_progress=sweep.show_progress,
            )
            results[index] = load_run_files(files)


def evaluate_checkpoints(
    model_name: str,
    model_path: str | None,
    lora_paths: Sequence[str],
    lora_config: LoraConfig | None,
    eval_config: EvalConfig,
    output_dir: str | os.PathLike,
    *,
    given_lora_fields: Collection[str] | None = None,
    include_base: bool = True,
    data_path: str | None = None,
    num_examples: int | None = None,
    dtype: str = "bfloat16",
    resume: bool = True,
    overwrite: bool = False,
    show_progress: bool = True,
    load_lora_fn: LoadLoraFn | None = None,
    devices_per_checkpoint: int = 0,
    mesh_model: int = 1,
    process_index: int = 0,
    num_processes: int = 1,
    timeout_s: float = 24 * 3600,
    check_tags: Callable[[list[str]], Any] | None = None,
) -> list[RunResult]:
    """Evaluates a base model and each of its LoRA checkpoints, in one process.

    The local devices are split into groups of `devices_per_checkpoint`;
    each group loads the base weights once, straight into its own mesh, and
    takes the next run not yet taken until none is left, side by side with
    the other groups. Each checkpoint is attached beside the base weights
    (replacing the one before; the base run has none), and one `Sampler`
    per group and structure (base, LoRA attached, LoRA merged) serves its
    runs, compiled once.
    A `load_lora_fn` that changes the weights instead finds the base
    weights put back before each run (the model keeps references to the
    base arrays, so this costs no memory). Each run's files and
    tag are those `eval_gsm8k.py` / `eval_gsm8k_base.py` would write with
    the same settings, so runs resume and compare alike.

    Several processes (hosts) share the runs: process p evaluates runs p,
    p + num_processes, ... on its own devices, and process 0 then waits for
    the others' summaries in `output_dir` (storage every host shares).

    Args:
      model_name: a name from `specs.MODELS`.
      model_path: hub id, local folder or gs:// folder; None or "" for the
        model's default source.
      lora_paths: LoRA checkpoints, anything `resolve_lora_checkpoint`
        accepts (local or gs://).
      lora_config: rank, alpha and module_path the adapters were trained with,
        or None to use what each checkpoint records. A checkpoint that
        records its own (our trainer's) is evaluated with those, and refused
        where they contradict a field of `lora_config` named in
        `given_lora_fields` (None: every field); one that records none
        (Tunix's) needs `lora_config`.
      given_lora_fields: the fields of `lora_config` that were chosen (the
        `--model.lora_config.*` flags given), not left at their defaults.
      eval_config: the evaluation settings (stop ids included).
      output_dir: the folder for every run's files.
      include_base: also evaluate the base model, first.
      data_path: GSM8K JSONL file; default the bundled test set.
      num_examples: evaluate the first N problems only.
      dtype: weights dtype, as `--model.dtype`.
      resume: continue runs found in `output_dir`.
      overwrite: replace runs found in `output_dir`.
      show_progress: show a progress bar per run.
      load_lora_fn: applies a checkpoint to the model in place;
        `gsm8k_jax.checkpoints.lora.load_lora` (attaching it) by default.
        Runs of another loader record lora_mode "custom", which `evaluate`
        cannot check against the model.
      devices_per_checkpoint: local devices per group (0: one group of all
        local devices, evaluating the runs one after another).
      mesh_model: tensor-parallel devices within a group (`--mesh_model`).
      process_index, num_processes: this process's share of the runs.
      timeout_s: how long process 0 waits for the other processes' runs.
      check_tags: called with the runs' tags, in order, once every input is
        checked and before anything is evaluated (e.g. that a baseline
        named on the command line is one of them); may raise.

    Returns:
      The runs, base first, then the checkpoints in order; in a process
      other than 0, only its own runs.

    Raises:
      ValueError: nothing to evaluate, two checkpoints would share a tag, or
        the devices do not split into groups as asked.
      ResultsError: `output_dir` holds other runs under the same tags.
      CheckpointError, SourceError: a checkpoint or the model cannot be
        read, or a checkpoint's factors do not fit the model (another rank
        or size: checked from their shapes before anything is evaluated).
    """
    from gsm8k_jax.checkpoints import lora as lora_lib  # qwix, orbax: heavy.
    from gsm8k_jax.checkpoints import lora_checkpoint

    # A loader of the user's may change the weights in any way, which
    # `evaluate` cannot check against the run record: recorded as "custom".
    custom_loader = load_lora_fn not in (None, lora_lib.load_lora)
    load_lora_fn = load_lora_fn or lora_lib.load_lora
    if not lora_paths and not include_base:
        raise ValueError("Nothing to evaluate: no LoRA checkpoint and no base model.")
    groups = device_groups(jax.local_devices(), devices_per_checkpoint, mesh_model)
    # Every input is checked before the model is loaded.
    # (path as given, resolved path); ("", "") is the base model.
    checkpoints = [("", "")] if include_base else []
    trained_loras = {}
    for raw_path in lora_paths:
        trained = lora_checkpoint.resolve_trained_lora(
            raw_path, lora_config, given=given_lora_fields
        )
        alpha_given = given_lora_fields is None or "alpha" in given_lora_fields
        if not trained.recorded and not alpha_given:
            # (A LoraConfig left at its default alpha warns as it loads.)
            logging.warning(
                "%s records no LoRA alpha (Tunix writes none): using alpha %g, the"
                " default; pass --model.lora_config.alpha=<the training run's>.",
                trained.params_path,
                trained.config.alpha,
            )
        trained_loras[trained.params_path] = trained
        checkpoints.append((str(raw_path), trained.params_path))
    data_path = str(data_path or BUNDLED_TEST_SET)
    examples = load_gsm8k(data_path, num_examples)
    model_dir = resolve_model_dir(model_path or model_spec(model_name).default_path)
    weights_config = load_config(model_dir)
    check_model_parallelism(weights_config.num_heads, mesh_model)
    check_generation_limit(eval_config, weights_config, model_dir)
    if not custom_loader:  # A loader of the user's may read other layouts.
        lora_lib.check_trained_loras(weights_config, trained_loras.values())
    if warning := shape_warning(model_name, weights_config, model_dir):
        logging.warning("%s", warning)

    runs: list[_Run] = []
    warned: set[str] = set()
    for raw_path, lora_path in checkpoints:
        model = model_config(model_name)
        model.model_path = model_path or ""
        model.dtype = dtype
        trained = trained_loras.get(lora_path)
        run_lora_config = trained.config if trained else lora_config
        if run_lora_config is not None:  # The base model's flags, or defaults.
            model.lora_config = dataclasses.asdict(run_lora_config)
        model.lora_checkpoint_path = raw_path
        info = run_info(
            model.to_dict(),
            model_dir=model_dir,
            lora_path=lora_path,
            data_path=data_path,
            num_examples=len(examples),
            eval_config=eval_config,
            mesh_model=mesh_model,
            lora_mode="custom" if custom_loader else "attached",
        )
        if trained:
            revision = info["model_revision"]
            for warning in trained_lora_warnings(
                trained, revision, model_dir, eval_config
            ):
                if warning not in warned:  # Steps of one training run: once.
                    warned.add(warning)
                    logging.warning("%s", warning)
        tag = run_tag_of(info)  # The tag the scripts give this record's run.
        files = RunFiles(output_dir, tag)
        runs.append((lora_path, files, info))
    by_tag: dict[str, list[str]] = {}
    for (raw_path, _), (_, files, _) in zip(checkpoints, runs, strict=True):
        by_tag.setdefault(files.tag, []).append(raw_path)
    for tag, paths in by_tag.items():
        if len(paths) > 1:
            raise ValueError(
                f"Checkpoints {' and '.join(paths)} would share run tag {tag} (a tag"
                " names a checkpoint by the last components of its path, and"
                " checkpoints/actor means its latest step): evaluate them into"
                " separate output folders, or name each step once."
            )
    if check_tags is not None:
        check_tags([files.tag for _, files, _ in runs])
    mine = [(i, r) for i, r in enumerate(runs) if i % num_processes == process_index]
    # Each run is this process's (`run_lock`) from its prepare until its
    # evaluation ends, and no longer than this sweep.
    try:
        for _, (_, files, info) in mine:
            files.prepare(info, resume=resume, overwrite=overwrite)

        work: queue.SimpleQueue[tuple[int, _Run]] = queue.SimpleQueue()
        for item in mine:
            work.put(item)
        results: dict[int, RunResult] = {}
        stop = threading.Event()
        errors: list[BaseException] = []

        sweep = _Sweep(
            model_name,
            model_dir,
            dtype,
            {path: trained.config for path, trained in trained_loras.items()},
            eval_config,
            examples,
            show_progress,
            load_lora_fn,
            mesh_model,
        )

        def evaluate_on(devices: list[jax.Device]) -> None:
            try:
                _evaluate_on(devices, sweep, work, results, stop)
            except BaseException as e:  # Re-raised in the calling thread.
                stop.set()
                errors.append(e)

        groups = groups[: len(mine)]  # No group without a run to take.
        # Daemon threads: Ctrl-C stops the process (finished rows are on disk).
        threads = [
            threading.Thread(target=evaluate_on, args=(g,), daemon=True) for g in groups
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        except BaseException:  # Ctrl-C, SIGTERM: no group takes another run.
            stop.set()
            raise
        if errors:
            raise errors[0]
    finally:
        for _, (_, files, _) in mine:
            files.release()
    if process_index != 0:
        return [results[i] for i, _ in mine]
    deadline = time.monotonic() + timeout_s
    for i, (_, files, _) in enumerate(runs):
        if i not in results:
            _wait_for_summary(files, deadline, output_dir)
        results.setdefault(i, load_run_files(files))
    return [results[i] for i in range(len(runs))]


def _wait_for_summary(
    files: RunFiles,
    deadline: float,
    output_dir: str | os.PathLike,
    poll_s: float = RUN_POLL_S,
) -> None:
    """Until another process has finished the run `files` names."""
    while not storage.exists(files.summary_path):
        stop_signals.raise_if_stopped()
        if time.monotonic() > deadline:
            raise ResultsError(
                f"Timed out waiting for run {files.tag} (another process's)"
                f" in {output_dir}."
            )
        time.sleep(poll_s)
