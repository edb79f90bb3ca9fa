"""The GSM8K evaluation loop: prompts -> batched generation -> scored rollouts.

`evaluate` is what both scripts and notebooks call. It commits results as
sequences finish (chunks, see `results.py`), resumes an interrupted run,
lets process 0 of a multi-host run wait for the others' chunks, and
summarises the merged rollouts file into accuracy with a 95% interval and
the run's identity.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from tqdm import tqdm

from gsm8k_jax import stop_signals
from gsm8k_jax.checkpoints.lora_config import LORA_MODES
from gsm8k_jax.checkpoints.lora_state import lora_mode
from gsm8k_jax.compilation_cache import cache_counts
from gsm8k_jax.eval import tasks
from gsm8k_jax.eval.data import GSM8KExample
from gsm8k_jax.eval.extraction import EXTRACTION_METHODS
from gsm8k_jax.eval.prompts import DEFAULT_PROMPT_TEMPLATE
from gsm8k_jax.eval.provenance import run_metadata
from gsm8k_jax.eval.results import ResultsError, Rollout, RunFiles
from gsm8k_jax.eval.run_record import (
    differing_settings,
    eval_record,
    flat_settings,
    run_tag_of,
)
from gsm8k_jax.eval.scoring import rescore, score, summarize
from gsm8k_jax.eval.stopping import (
    cut_at_stop_sequences,
    stop_token_sequences,
    with_eos_text,
)
from gsm8k_jax.models.gemma3.config import Gemma3Config
from gsm8k_jax.models.gemma3.sharding import MODEL
from gsm8k_jax.sampling.requests import repeated_ids
from gsm8k_jax.sampling.sampler import Sampler, SamplingParams


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Settings of an evaluation that affect its results (batch_size does not,
    by construction, but is recorded).

    `sampling` and `use_chat_template` left unset (None) are the task's, as
    the scripts' `--task` sets them, and never None once made: an lm-eval
    task generates at most its `max_gen_toks` (256, as lm-eval) through its
    own prompt, chat or not (its `_chat` form); `boxed` generates up to 768
    tokens through the chat template. A `SamplingParams` of your own brings
    its own `max_generation_steps`. An lm-eval task refuses a prompt
    template or chat setting of its own, which its prompt would ignore.
    `dataclasses.replace(config, task=...)` keeps the other fields as they
    are: pass `sampling=None, use_chat_template=None` for the new task's.
    """

    batch_size: int = 32
    sampling: SamplingParams | None = None  # None: the task's (see above)
    extraction_method: str = "strict"
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    system_prompt: str | None = None
    use_chat_template: bool | None = None  # None: the task's (see above)
    task: str = tasks.BOXED  # a preset of tasks.TASKS (see tasks.task_eval_config)
    # Slots per decode program (None: the platform's, `batching.ROW_TILES`).
    # Results are bitwise the same at any batch size for one row tile.
    row_tile: int | None = None

    def __post_init__(self):
        task = tasks.get_task(self.task)
        lm_eval = task.lm_eval_task is not None
        if self.sampling is None:
            sampling = SamplingParams(max_generation_steps=task.max_gen_toks)
            object.__setattr__(self, "sampling", sampling)
        if self.use_chat_template is None:
            object.__setattr__(self, "use_chat_template", task.chat or not lm_eval)
        if self.system_prompt == "":  # As the scripts read an empty flag.
            object.__setattr__(self, "system_prompt", None)
        if lm_eval and self.use_chat_template != task.chat:
            form = (
                f"{task.lm_eval_task}_chat"
                if self.use_chat_template
                else task.lm_eval_task
            )
            raise ValueError(
                f"task={task.name!r} is lm-eval's {'chat' if task.chat else 'plain'}"
                f" prompt: for the {'chat' if self.use_chat_template else 'plain'} one,"
                f" use task={form!r} and leave use_chat_template unset (with"
                " dataclasses.replace, pass use_chat_template=None, sampling=None)."
            )
        if lm_eval and self.prompt_template != DEFAULT_PROMPT_TEMPLATE:
            raise ValueError(
                f"prompt_template applies to task='boxed'; task={task.name!r} uses"
                " lm-eval's prompt."
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.row_tile is not None and self.row_tile < 1:
            raise ValueError(f"row_tile must be >= 1, got {self.row_tile}.")
        if "{question}" not in self.prompt_template:
            raise ValueError(
                "The prompt template (--prompt_template) must contain '{question}',"
                f" where each problem goes; got {self.prompt_template!r}."
            )
        samples = self.sampling.num_samples
        if samples > 1 and self.sampling.temperature == 0:
            raise ValueError(
                f"num_samples={samples} at temperature 0 (greedy) gives {samples}"
                " identical samples: set a temperature > 0 (--temperature=0.7) for"
                " pass@k and maj@k."
            )
        if self.extraction_method not in EXTRACTION_METHODS:
            raise ValueError(
                f"extraction_method must be one of {EXTRACTION_METHODS}, got"
                f" {self.extraction_method!r}."
            )


def check_generation_limit(
    config: EvalConfig, model: Gemma3Config, model_dir: str | Path
) -> None:
    """A generation limit the model's context cannot hold with any prompt fails
    before the weights load (the sampler checks each prompt's length too)."""
    steps, context = config.sampling.max_generation_steps, model.max_position_embeddings
    if steps >= context:
        raise ValueError(
            f"max_generation_steps={steps} (--max_generation_steps) leaves no room"
            f" for a prompt in the model's context of {context} tokens"
            f" (max_position_embeddings in {model_dir}/config.json); GSM8K answers"
            " take a few hundred tokens."
        )


def _check_record_matches(
    sampler: Sampler,
    examples: Sequence[GSM8KExample],
    config: EvalConfig,
    run_info: dict[str, Any],
) -> None:
    """Refuses a run record that says other than what this call runs (its
    evaluation settings, problem count, row tile, tensor parallelism, model
    dtype): the rows would go under the tag and record of a run they are not
    (a script run with the recorded settings would adopt them as its own).
    A record of no run (`{}`) is not checked, nor a setting a record leaves
    unsaid (None, or absent in an older one); settings are compared as
    `differing_settings` compares runs (a greedy run's unused ones aside)."""
    if "eval" not in run_info:
        return
    mesh = sampler.mesh
    dtype = jnp.dtype(sampler.model.dtype).name
    model_parallel = mesh.shape[MODEL] if mesh else 1
    # name: (this call's value, where it comes from, how to make them agree)
    running = {
        "num_examples": (len(examples), "examples", "num_examples=len(examples)"),
        "row_tile": (
            sampler.row_tile,
            "the sampler",
            f"EvalConfig(row_tile={sampler.row_tile}) for run_info and evaluate",
        ),
        "mesh_model": (
            model_parallel,
            "the sampler's mesh",
            f"mesh_model={model_parallel}",
        ),
        "model.dtype": (
            dtype,
            "the model",
            f"the model's dtype in its model config ({dtype!r})",
        ),
    } | {
        name: (value, "config", "eval_config=config")
        for name, value in flat_settings({"eval": eval_record(config)}).items()
    }
    recorded = {
        name: value
        for name, value in flat_settings(run_info).items()
        if name in running and value is not None
    }
    differing = differing_settings(
        recorded, {name: running[name][0] for name in recorded}
    )
    if differing:
        found = "; ".join(
            f"{name}={recorded[name]!r} in run_info but {running[name][0]!r} in"
            f" {running[name][1]}"
            for name in differing
        )
        remedies = ", ".join(dict.fromkeys(running[name][2] for name in differing))
        raise ValueError(
            f"run_info does not record what this call runs: {found}. Make run_info"
            f" for this run (gsm8k_jax.run_info) with {remedies}."
        )


def _check_lora_matches(model: Any, run_info: dict[str, Any]) -> None:
    """Refuses a model whose LoRA (`lora_mode(model)`) contradicts the run
    record: a LoRA where it records the base model, or, where it records a
    checkpoint and how it is applied, none or another way. A record of no
    run (no `lora_checkpoint`, e.g. `{}`) is not checked, nor a mode an
    older record or a custom loader ("custom") leaves unsaid."""
    if "lora_checkpoint" not in run_info:
        return
    carried, recorded = lora_mode(model), run_info.get("lora_mode")
    checkpoint = run_info["lora_checkpoint"]
    if not checkpoint and carried is not None:
        remedy = {
            "attached": "detach_lora(model) first",
            "merged": "load the base model again (load_pretrained) first",
            "qwix": "evaluate the base model it was made from",
        }[carried]
        raise ValueError(
            f"The model carries a LoRA ({carried}) but run_info records the base"
            " model (lora_path=''): evaluate it under its checkpoint's run_info"
            f" (lora_path=...), or {remedy}."
        )
    if not checkpoint or recorded not in LORA_MODES or carried == recorded:
        return
    apply = {
        "attached": f"load_lora(model, {checkpoint!r}, ...)",
        "merged": f"load_lora(model, {checkpoint!r}, ..., merge=True)",
        "qwix": f"apply_lora(model, restore_lora_params({checkpoint!r}), ...)",
    }[recorded]
    if carried is None:
        raise ValueError(
            f"run_info records LoRA checkpoint {checkpoint} ({recorded}) but the"
            f" model carries none: {apply} first."
        )
    raise ValueError(
        f"run_info records LoRA checkpoint {checkpoint} {recorded} but the model"
        f" carries its LoRA {carried}: pass run_info(..., lora_mode={carried!r}),"
        f" or apply it as recorded ({apply}, on the base model)."
    )


def _rollout(
    example: GSM8KExample,
    prompt: str,
    completion,
    method: str,
    task: tasks.Task,
    stops: Sequence[str],
) -> Rollout:
    """The scored rollout of a completion, cut at the task's stop strings
    (finish_reason `stop`); num_tokens and logprob cover every token
    generated: up to the stop string's last token where generation ended
    there (`stopping.stop_token_sequences`), else past it to an eos id or
    the length limit."""
    response = cut_at_stop_sequences(completion.text, stops)
    stopped = response != completion.text
    if completion.finish_reason == "stop" and not stopped:
        # Stop sequences are the tokens that write a stop string: their text
        # holds one (else the response would end elsewhere than lm-eval's).
        raise RuntimeError(
            f"Example {example.id} stopped on a stop sequence its text does not"
            f" show ({stops!r}); please report this with the tokenizer used."
        )
    return Rollout(
        id=example.id,
        sample_index=completion.sample_index,
        question=example.question,
        gold=example.gold,
        reference_solution=example.answer,
        prompt=prompt,
        response=response,
        **score(response, example.gold, example.answer, method, task),
        num_tokens=completion.num_tokens,
        finish_reason="stop" if stopped else completion.finish_reason,
        logprob=completion.logprob,
    )


def evaluate(
    sampler: Sampler,
    examples: Sequence[GSM8KExample],
    config: EvalConfig,
    files: RunFiles | str | os.PathLike[str],
    *,
    run_info: dict[str, Any],
    show_progress: bool = True,
    num_processes: int = 1,
    merge_timeout_s: float = 24 * 3600,
) -> dict[str, Any] | None:
    """Evaluates `examples`, skipping those already in `files`; returns the summary.

    `files` is an output folder (local or gs://), where the run's files take
    the tag `run_tag_of(run_info)` and a run there is resumed, as the
    scripts do by default; or a `RunFiles` on which `prepare` has been
    called (it validates the output folder), to choose the tag, resuming
    or overwriting.
    In a multi-host run (num_processes > 1, `files.process_index` this
    process's index) a process evaluates only examples[process::num_processes],
    padded exactly as a single-host run pads them, and commits its own
    chunks; process 0 then waits (up to `merge_timeout_s`) until every
    example is committed, and writes the files a single-host run writes.
    Other processes return None.

    A model that carries a LoRA other than `run_info` records (one where it
    records the base model, none or another way of applying it where it
    records a checkpoint: `lora_state.lora_mode`) is refused before any
    work, so that no results go under another run's tag; and so is a
    `run_info` whose evaluation settings, problem count, row tile, tensor
    parallelism or model dtype are not this call's.
    """
    in_folder = not isinstance(files, RunFiles)
    if in_folder:
        files = _folder_files(files, run_info, num_processes)
    try:
        if in_folder:
            # Refused before the folder changes: preparing may already
            # rewrite its record and remove its summary (a longer run).
            _check_call(sampler, examples, config, run_info)
            _prepare_to_resume(files, run_info)
        else:
            _check_prepared(files)
            _check_call(sampler, examples, config, run_info)
        return _evaluate_run(
            sampler,
            examples,
            config,
            files,
            run_info=run_info,
            show_progress=show_progress,
            num_processes=num_processes,
            merge_timeout_s=merge_timeout_s,
        )
    finally:
        files.release()  # Finished or failed, this process runs it no more.


def _folder_files(
    output_dir: str | os.PathLike[str], run_info: dict[str, Any], num_processes: int
) -> RunFiles:
    """The run's files in `output_dir`, named as the scripts name them."""
    if not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(
            "files is an output folder or a RunFiles(output_dir, tag) prepared with"
            f" files.prepare(run_info, ...), not {output_dir!r}."
        )
    if num_processes > 1 or jax.process_count() > 1:
        raise ValueError(
            "A multi-host run takes files=RunFiles(output_dir, tag, process_index),"
            " which process 0 prepares (files.prepare(run_info, ...)) and the others"
            " check, not an output folder."
        )
    if not isinstance(run_info, Mapping):
        raise TypeError(
            f"run_info is the record gsm8k_jax.run_info(...) returns, not {run_info!r}."
        )
    try:
        return RunFiles(output_dir, run_tag_of(run_info))
    except KeyError as e:
        raise ValueError(
            f"run_info is the record gsm8k_jax.run_info(...) returns; it lacks {e}."
        ) from None
    except (TypeError, AttributeError) as e:
        raise ValueError(
            f"run_info is the record gsm8k_jax.run_info(...) returns; reading its"
            f" tag failed ({e})."
        ) from None


def _prepare_to_resume(files: RunFiles, run_info: dict[str, Any]) -> None:
    """`files.prepare`, resuming, with the remedies named for Python callers
    (the folder's own messages name the scripts' flags)."""
    try:
        files.prepare(run_info, resume=True, overwrite=False)
    except ResultsError as e:
        raise ResultsError(
            f"{e} From Python: evaluate into another folder, or pass"
            " files=RunFiles(output_dir, tag) prepared with overwrite=True."
        ) from None


def _check_prepared(files: RunFiles) -> None:
    if files.read_run_info() is None:
        raise ValueError(
            f"{files.output_dir} holds no run record of run '{files.tag}': call"
            " files.prepare(run_info, resume=..., overwrite=...) before evaluate (it"
            " checks the folder and records what produces the results)."
        )


def _check_call(
    sampler: Sampler,
    examples: Sequence[GSM8KExample],
    config: EvalConfig,
    run_info: dict[str, Any],
) -> None:
    """Refuses a call whose model, settings or problems `run_info` does not
    record, before any work."""
    _check_lora_matches(sampler.model, run_info)
    if config.row_tile is not None and sampler.row_tile != config.row_tile:
        raise ValueError(
            f"The sampler decodes {sampler.row_tile} rows per tile, the evaluation"
            f" asks for {config.row_tile}: build it with Sampler(...,"
            f" row_tile={config.row_tile})."
        )
    _check_record_matches(sampler, examples, config, run_info)
    if repeated := repeated_ids([e.id for e in examples]):
        raise ValueError(
            f"Problem ids {repeated[:5]} repeat: results are kept by id, so each"
            " problem needs its own (load_gsm8k numbers them by line)."
        )


def _evaluate_run(
    sampler: Sampler,
    examples: Sequence[GSM8KExample],
    config: EvalConfig,
    files: RunFiles,
    *,
    run_info: dict[str, Any],
    show_progress: bool,
    num_processes: int,
    merge_timeout_s: float,
) -> dict[str, Any] | None:
    """`evaluate`, once `files` is prepared and the call checked."""
    started_at = _now()
    params = config.sampling
    method = config.extraction_method
    task = tasks.get_task(config.task)
    # Only this run's examples: rows of other ids (a chunk of another run)
    # are left out, with a warning.
    wanted = {e.id for e in examples}
    done = rescore(files.read_finished(params.num_samples, wanted), method, task)
    finished_ids = {r["id"] for r in done}
    if finished_ids and show_progress:
        print(
            f"{files.tag}: all {len(examples)} problems were already finished;"
            " summarising them."
            if len(finished_ids) == len(examples)
            else f"Resuming {files.tag}: {len(finished_ids)} of {len(examples)}"
            " problems are already finished.",
            file=sys.stderr,
            flush=True,
        )
    shard = examples[files.process_index :: num_processes]
    todo = [e for e in shard if e.id not in finished_ids]
    # All examples' prompts, in order: a few-shot task's draws depend on it.
    prompt_texts = tasks.format_prompts(
        task,
        [e.question for e in examples],
        sampler.tokenizer,
        template=config.prompt_template,
        system_prompt=config.system_prompt,
        use_chat_template=config.use_chat_template,
    )
    prompts = {e.id: p for e, p in zip(examples, prompt_texts, strict=True)}
    # Size the KV cache for the longest prompt of the whole run, so a resumed
    # run compiles the same decode program as an uninterrupted one.
    max_prompt_len = max(len(sampler.encode(p)) for p in prompts.values())
    # No more slots than the run has problems (more would only hold KV-cache
    # memory); the run keeps the batch size asked for in its tag and record,
    # so a rerun on more problems extends it.
    batch_size = min(config.batch_size, len(examples)) * params.num_samples
    stops = with_eos_text(task.until, sampler.tokenizer) if task.until else []
    stop_sequences = stop_token_sequences(stops, sampler.tokenizer)

    start = time.perf_counter()
    cached_before = cache_counts()
    if todo and show_progress:
        print(
            f"Compiling the model's programs for {files.tag}...",
            file=sys.stderr,
            flush=True,
        )
    sampler.compile(
        [prompts[e.id] for e in todo],
        params,
        batch_size=batch_size,
        max_prompt_len=max_prompt_len,
        stop_sequences=stop_sequences,
    )
    compile_s = time.perf_counter() - start
    if todo and show_progress:
        print(f"Compiled in {compile_s:.1f} s.", file=sys.stderr, flush=True)

    generation_start = time.perf_counter()
    phases_before = sampler.phase_seconds.copy()
    with tqdm(
        total=len(shard),
        initial=len(shard) - len(todo),
        unit="ex",
        desc=f"GSM8K {files.tag}",
        disable=not (show_progress and todo),
        dynamic_ncols=True,
    ) as bar:
        _generate(
            sampler,
            todo,
            prompts,
            config,
            files,
            bar,
            done,
            max_prompt_len,
            task,
            stops,
            stop_sequences,
            batch_size,
        )
    if files.process_index != 0:
        return None
    rollouts = _wait_for_all(
        files,
        examples,
        params.num_samples,
        timeout_s=merge_timeout_s if num_processes > 1 else 0.0,
    )
    # In (id, sample) order, and every line scored under this run's method.
    files.write_rollouts(rescore(rollouts, method, task))

    generation_s = time.perf_counter() - generation_start
    phases = sampler.phase_seconds - phases_before
    cached = {k: v - cached_before[k] for k, v in cache_counts().items()}
    summary = summarize(files.read_rollouts(), params.num_samples, method, task)
    summary |= run_metadata(files.tag, run_info)
    # Generated in this session, by every process.
    new_tokens = sum(r["num_tokens"] for r in rollouts if r["id"] not in finished_ids)
    summary |= {
        "started_at": started_at,
        "finished_at": _now(),
        "compile_s": compile_s,
        # Programs read from and written to the persistent compilation cache.
        "compilation_cache": cached,
        # Where this session's time went: compile, then the sampler's phases
        # (host: scheduling, detokenising and writing results).
        "phase_seconds": {
            "compile": compile_s,
            **{p: phases[p] for p in ("prefill", "decode", "host")},
        },
        "wall_time_s": compile_s + generation_s,
        # Over this session's time after compilation.
        "tokens_per_s": new_tokens / generation_s if generation_s > 0 else 0.0,
        "resumed_examples": len(finished_ids),
    }
    if num_processes > 1:
        summary["num_shards"] = num_processes
    files.write_summary(summary)
    files.remove_chunks()
    return summary


def _generate(
    sampler: Sampler,
    todo: Sequence[GSM8KExample],
    prompts: dict[int, str],
    config: EvalConfig,
    files: RunFiles,
    bar: tqdm,
    done: Sequence[dict[str, Any]],
    max_prompt_len: int,
    task: tasks.Task,
    stops: Sequence[str],
    stop_sequences: Sequence[Sequence[int]],
    batch_size: int,
) -> None:
    """Generates the `todo` examples' answers, `batch_size` rows at a time,
    committing each group of finished rollouts to `files` as it comes, and
    keeps `bar` up to date.
    The task's stop strings cut the responses; generation ends at
    `stop_sequences`, the tokens that write them."""
    params = config.sampling
    by_id = {e.id: e for e in todo}
    correct_so_far = sum(r["correct"] for r in done)
    rows_so_far = len(done)
    new_tokens = 0
    samples_left = {e.id: params.num_samples for e in todo}
    start = time.perf_counter()
    stream = sampler.generate_stream(
        [prompts[e.id] for e in todo],
        params,
        example_ids=[e.id for e in todo],
        batch_size=batch_size,
        max_prompt_len=max_prompt_len,
        stop_sequences=stop_sequences,
    )
    for completions in stream:
        rollouts = [
            _rollout(
                by_id[c.example_id],
                prompts[c.example_id],
                c,
                config.extraction_method,
                task,
                stops,
            )
            for c in completions
        ]
        files.append(rollouts)
        new_tokens += sum(r.num_tokens for r in rollouts)
        correct_so_far += sum(r.correct for r in rollouts)
        rows_so_far += len(rollouts)
        for r in rollouts:
            samples_left[r.id] -= 1
        bar.update(sum(samples_left[i] == 0 for i in {r.id for r in rollouts}))
        bar.set_postfix(
            acc=f"{correct_so_far / rows_so_far:.2%}",
            tok_s=f"{new_tokens / (time.perf_counter() - start):.0f}",
        )


def _wait_for_all(
    files: RunFiles,
    examples: Sequence[GSM8KExample],
    num_samples: int,
    *,
    timeout_s: float,
    poll_s: float = 2.0,
) -> list[dict[str, Any]]:
    """Every example's rollouts, once all are committed (by every process of
    a multi-host run; a single process has committed all of them already)."""
    wanted = {e.id for e in examples}
    deadline = time.monotonic() + timeout_s
    while True:
        rollouts = files.read_finished(num_samples)
        missing = wanted - {r["id"] for r in rollouts}
        if not missing:
            return [r for r in rollouts if r["id"] in wanted]
        stop_signals.raise_if_stopped()
        if time.monotonic() > deadline:
            raise ResultsError(
                f"Timed out waiting for {len(missing)} examples (ids"
                f" {sorted(missing)[:10]}...) from the other processes in"
                f" {files.output_dir}; rerun the same command to resume."
            )
        time.sleep(poll_s)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
