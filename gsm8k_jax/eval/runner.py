"""The GSM8K evaluation loop: prompts -> batched generation -> scored rollouts.

`evaluate` is what both scripts and notebooks call. It writes results batch
by batch (see `results.py`), resumes an interrupted run, and summarises the
rollouts file into accuracy with a 95% interval and the run's identity.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from gsm8k_jax.eval.data import GSM8KExample
from gsm8k_jax.eval.extraction import (
    EXTRACTION_METHODS,
    answers_match,
    extract_answer,
    is_correct,
)
from gsm8k_jax.eval.prompts import DEFAULT_PROMPT_TEMPLATE, format_prompt
from gsm8k_jax.eval.results import ResultsError, Rollout, RunFiles
from gsm8k_jax.eval.stats import (
    accuracy_interval,
    clustered_mean_accuracy,
    maj_at_k,
    pass_at_k,
)
from gsm8k_jax.sampling.sampler import Sampler, SamplingParams

_VERSIONED_PACKAGES = (
    "gsm8k_jax",
    "jax",
    "jaxlib",
    "flax",
    "transformers",
    "qwix",
    "orbax-checkpoint",
)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Settings of an evaluation that affect its results (batch_size does not,
    by construction, but is recorded)."""

    batch_size: int = 32
    sampling: SamplingParams = SamplingParams()
    extraction_method: str = "strict"
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    system_prompt: str | None = None
    use_chat_template: bool = True

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.extraction_method not in EXTRACTION_METHODS:
            raise ValueError(
                f"extraction_method must be one of {EXTRACTION_METHODS}, got"
                f" {self.extraction_method!r}."
            )


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    return versions


def summarize(
    rollouts: Sequence[dict[str, Any]], num_samples: int, method: str
) -> dict[str, Any]:
    """Accuracy (over all samples) with a Wilson 95% interval, failure counts,
    and pass@k / maj@k when several samples were drawn per question."""
    correct = sum(r["correct"] for r in rollouts)
    total = len(rollouts)
    low, high = accuracy_interval(correct, total) if total else (0.0, 0.0)
    summary: dict[str, Any] = {
        "correct": correct,
        "total": total,
        "num_examples": len({r["id"] for r in rollouts}),
        "accuracy": correct / total if total else 0.0,
        "accuracy_ci95": [low, high],
        "extraction_failures": sum(r["extracted_answer"] is None for r in rollouts),
        "truncations": sum(r["finish_reason"] == "length" for r in rollouts),
        "generated_tokens": sum(r["num_tokens"] for r in rollouts),
    }
    if num_samples > 1 and total:
        by_id: dict[int, list[dict[str, Any]]] = {}
        for r in sorted(rollouts, key=lambda r: (r["id"], r["sample_index"])):
            by_id.setdefault(r["id"], []).append(r)
        groups = list(by_id.values())
        grid = np.array([[r["correct"] for r in g] for g in groups], dtype=float)
        mean, se = (
            clustered_mean_accuracy(grid) if len(groups) > 1 else (grid.mean(), 0.0)
        )
        summary |= {
            f"pass@{num_samples}": float(
                np.mean(
                    [
                        pass_at_k(num_samples, int(row.sum()), num_samples)
                        for row in grid
                    ]
                )
            ),
            f"maj@{num_samples}": maj_at_k(
                [[r["extracted_answer"] for r in g] for g in groups],
                [g[0]["gold"] for g in groups],
                equal=answers_match,
            ),
            "mean_accuracy": float(mean),
            "mean_accuracy_clustered_se": float(se),
        }
    return summary


def _score(example: GSM8KExample, prompt: str, completion, method: str) -> Rollout:
    return Rollout(
        id=example.id,
        sample_index=completion.sample_index,
        question=example.question,
        gold=example.gold,
        prompt=prompt,
        response=completion.text,
        extracted_answer=extract_answer(completion.text, method),
        correct=is_correct(completion.text, example.gold, method),
        num_tokens=completion.num_tokens,
        finish_reason=completion.finish_reason,
        logprob=completion.logprob,
    )


def evaluate(
    sampler: Sampler,
    examples: Sequence[GSM8KExample],
    config: EvalConfig,
    files: RunFiles,
    *,
    run_info: dict[str, Any],
    show_progress: bool = True,
    shard_index: int = 0,
    num_shards: int = 1,
) -> dict[str, Any]:
    """Evaluates `examples`, skipping those already in `files`; returns the summary.

    `files.prepare` must have been called (it validates the output folder).
    With num_shards > 1 (one shard per host) only examples[shard_index::num_shards]
    are evaluated, padded exactly as a single-host run pads them.
    """
    params = config.sampling
    done = files.load_finished(params.num_samples)
    finished_ids = {r["id"] for r in done}
    shard = examples[shard_index::num_shards]
    todo = [e for e in shard if e.id not in finished_ids]
    correct_so_far = sum(r["correct"] for r in done)
    rows_so_far = len(done)
    prompts = {
        e.id: format_prompt(
            e.question,
            sampler.tokenizer,
            template=config.prompt_template,
            system_prompt=config.system_prompt,
            use_chat_template=config.use_chat_template,
        )
        for e in examples
    }
    by_id = {e.id: e for e in examples}
    # Size the KV cache for the longest prompt of the whole run, so a resumed
    # run compiles the same decode program as an uninterrupted one.
    max_prompt_len = max(len(sampler.encode(p)) for p in prompts.values())

    start = time.perf_counter()
    new_tokens = 0
    samples_left = {e.id: params.num_samples for e in todo}
    bar = tqdm(
        total=len(shard),
        initial=len(shard) - len(todo),
        unit="ex",
        desc=f"GSM8K {files.tag}",
        disable=not show_progress,
        dynamic_ncols=True,
    )
    stream = sampler.generate_stream(
        [prompts[e.id] for e in todo],
        params,
        example_ids=[e.id for e in todo],
        batch_size=config.batch_size * params.num_samples,
        max_prompt_len=max_prompt_len,
    )
    for completions in stream:
        rollouts = [
            _score(
                by_id[c.example_id], prompts[c.example_id], c, config.extraction_method
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
        elapsed = time.perf_counter() - start
        bar.set_postfix(
            acc=f"{correct_so_far / rows_so_far:.2%}",
            tok_s=f"{new_tokens / elapsed:.0f}",
        )
    bar.close()
    files.sort_rollouts()

    wall = time.perf_counter() - start
    summary = summarize(
        files.read_rollouts(), params.num_samples, config.extraction_method
    )
    summary |= _run_metadata(files.tag, run_info, wall, new_tokens)
    summary["resumed_examples"] = len(finished_ids)
    files.write_summary(summary)
    return summary


def _run_metadata(
    tag: str, run_info: dict[str, Any], wall: float, tokens: int
) -> dict[str, Any]:
    return {
        "tag": tag,
        "run": run_info,
        "versions": library_versions(),
        "devices": [str(d) for d in jax.local_devices()],
        "wall_time_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
    }


def shard_tag(tag: str, shard_index: int, num_shards: int) -> str:
    return f"{tag}.shard{shard_index}of{num_shards}"


def merge_shards(
    output_dir: str,
    tag: str,
    num_shards: int,
    config: EvalConfig,
    run_info: dict[str, Any],
    *,
    timeout_s: float = 24 * 3600,
    poll_s: float = 2.0,
) -> dict[str, Any]:
    """Waits for every shard's summary, then writes the merged rollouts and
    summary under `tag`: the files a single-host run would write."""
    shards = [
        RunFiles(output_dir, shard_tag(tag, i, num_shards)) for i in range(num_shards)
    ]
    deadline = time.monotonic() + timeout_s
    while not all(f.summary_path.exists() for f in shards):
        if time.monotonic() > deadline:
            missing = [f.tag for f in shards if not f.summary_path.exists()]
            raise ResultsError(
                f"Timed out waiting for shards {missing} in {output_dir}."
            )
        time.sleep(poll_s)
    shard_summaries = [json.loads(f.summary_path.read_text()) for f in shards]
    rollouts = [r for f in shards for r in f.read_rollouts()]
    merged = RunFiles(output_dir, tag)
    merged.write_rollouts(rollouts)
    summary = summarize(rollouts, config.sampling.num_samples, config.extraction_method)
    summary |= _run_metadata(
        tag, run_info, max(s["wall_time_s"] for s in shard_summaries), 0
    )
    summary["tokens_per_s"] = sum(s["tokens_per_s"] for s in shard_summaries)
    summary["num_shards"] = num_shards
    merged.write_summary(summary)
    return summary
