"""Crash-safe, resumable result files of one evaluation run.

An output folder holds, per run tag:
- `run_<tag>.json`: what produced the results (model, checkpoint, settings);
  a rerun with other settings is refused rather than mixed in;
- `rollouts_<tag>.jsonl`: one line per (example, sample), appended and
  fsync'ed as sequences finish, so a crash loses only sequences in flight,
  and sorted by (id, sample) once the run is complete;
- `summary_<tag>.json`: written at the end from the rollouts file alone.

Resuming keeps every example whose samples are all on disk (a torn last
line from a crash is dropped), and the run continues with the rest.

A run's identity (its tag and the settings `run_<tag>.json` records) is
defined here too, so that reading and comparing runs needs neither the CLI
nor a model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_collections

if TYPE_CHECKING:
    from gsm8k_jax.checkpoints.lora import LoraConfig
    from gsm8k_jax.eval.runner import EvalConfig


class ResultsError(RuntimeError):
    """Result files cannot be written, or do not belong to this run."""


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One generated answer to one GSM8K problem, with its scores.

    `extracted_answer` and `correct` are the run's headline extraction
    method's; `extracted_answers` and `correct_by_method` hold every method's,
    so a run is re-scored without generating again.
    """

    id: int
    sample_index: int
    question: str
    gold: str  # the final answer, e.g. "18"
    reference_solution: str  # GSM8K's full solution, ending in "#### 18"
    prompt: str
    response: str
    extracted_answer: str | None
    correct: bool
    extracted_answers: dict[str, str | None]
    correct_by_method: dict[str, bool]
    num_tokens: int  # generated, past a stop string too
    finish_reason: str  # eos | length | stop (cut at a task's stop string)
    logprob: float


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunFiles:
    """The files of one run (one tag) inside an output folder."""

    def __init__(self, output_dir: str | os.PathLike, tag: str):
        self.output_dir = Path(output_dir)
        self.tag = tag
        self.run_path = self.output_dir / f"run_{tag}.json"
        self.rollouts_path = self.output_dir / f"rollouts_{tag}.jsonl"
        self.summary_path = self.output_dir / f"summary_{tag}.json"

    def prepare(
        self, run_info: dict[str, Any], *, resume: bool, overwrite: bool
    ) -> None:
        """`check`s, then (re)writes the run record."""
        self.check(run_info, resume=resume, overwrite=overwrite)
        if overwrite:
            for path in (self.rollouts_path, self.summary_path):
                path.unlink(missing_ok=True)
        _write_atomically(
            self.run_path, json.dumps(run_info, indent=2, sort_keys=True) + "\n"
        )

    def check(self, run_info: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
        """Checks the folder is writable and the files belong to this run.

        Raises before anything is changed on disk, so bad input never damages
        results already written.
        """
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            probe = self.output_dir / f".write_probe_{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ResultsError(
                f"Cannot write to output folder {self.output_dir}: {e.strerror or e}."
                " Choose another --output_dir."
            ) from e
        # A record without results (a start that failed before its first
        # finished sequence) blocks nothing: it is simply rewritten.
        existing = self.rollouts_path.exists() and self.rollouts_path.stat().st_size
        if existing and not overwrite:
            if not resume:
                raise ResultsError(
                    f"{self.output_dir} already holds results for run '{self.tag}'. Pass"
                    " --resume to continue them or --overwrite to replace them."
                )
            previous = (
                json.loads(self.run_path.read_text()) if self.run_path.exists() else {}
            )
            changed = _differing_settings(previous, run_info)
            if changed:
                raise ResultsError(
                    f"{self.output_dir} holds results of run '{self.tag}' made with other"
                    f" settings (differing: {', '.join(changed)}). Use another"
                    " --output_dir, or --overwrite to replace them."
                )

    def load_finished(self, num_samples: int) -> list[dict[str, Any]]:
        """Rollouts of fully finished examples; rewrites the file if a crash
        left a torn line or a partial example behind."""
        if not self.rollouts_path.exists():
            return []
        records, num_lines = self._parse_rollouts()
        kept = _finished(records, num_samples)
        if len(kept) != num_lines:
            _write_atomically(self.rollouts_path, "".join(_json_line(r) for r in kept))
        return kept

    def read_finished(self, num_samples: int) -> list[dict[str, Any]]:
        """Rollouts of fully finished examples, in file order, leaving the file
        as it is: for readers (comparisons) of a run that may still be running
        or may have crashed, which must not repair another process's file."""
        return _finished(self._parse_rollouts()[0], num_samples)

    def read_run_info(self) -> dict[str, Any] | None:
        """The run record (`run_<tag>.json`), or None when there is none."""
        if not self.run_path.exists():
            return None
        return json.loads(self.run_path.read_text(encoding="utf-8"))

    def read_summary(self) -> dict[str, Any] | None:
        """`summary_<tag>.json`, or None while the run has not finished."""
        if not self.summary_path.exists():
            return None
        return json.loads(self.summary_path.read_text(encoding="utf-8"))

    def _parse_rollouts(self) -> tuple[list[dict[str, Any]], int]:
        """The rollouts file's records and its number of lines; a torn final
        line (an interrupted write) is dropped, damage elsewhere raises."""
        lines = self.rollouts_path.read_text(encoding="utf-8").splitlines(keepends=True)
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if number == len(lines):
                    break  # Torn final line from an interrupted write.
                raise ResultsError(
                    f"{self.rollouts_path}, line {number}: not valid JSON ({e.msg}). The"
                    " file was edited or damaged; use --overwrite to start again."
                ) from e
        return records, len(lines)

    def append(self, rollouts: Iterable[Rollout]) -> None:
        """Appends one batch in a single write, then fsyncs."""
        text = "".join(_json_line(dataclasses.asdict(r)) for r in rollouts)
        with open(self.rollouts_path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def write_rollouts(self, records: Iterable[dict[str, Any]]) -> None:
        """Replaces the rollouts file with `records` in (id, sample) order:
        sequences finish out of order, but the finished file is the same
        however the run went."""
        records = sorted(records, key=lambda r: (r["id"], r["sample_index"]))
        _write_atomically(self.rollouts_path, "".join(_json_line(r) for r in records))

    def read_rollouts(self) -> list[dict[str, Any]]:
        with open(self.rollouts_path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def write_summary(self, summary: dict[str, Any]) -> None:
        _write_atomically(
            self.summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n"
        )


def _finished(records: list[dict[str, Any]], num_samples: int) -> list[dict[str, Any]]:
    """The records of examples with all `num_samples` samples, in their order."""
    counts: dict[int, int] = {}
    for r in records:
        counts[r["id"]] = counts.get(r["id"], 0) + 1
    return [r for r in records if counts[r["id"]] == num_samples]


def _differing_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted names of the settings that differ, e.g. `eval.sampling.seed`."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        out = {}
        for key, value in d.items():
            out |= flat(value, f"{prefix}.{key}" if prefix else str(key))
        return out

    a, b = flat(old), flat(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def model_config(model_name: str) -> ml_collections.ConfigDict:
    """The `--model` config of a named model; configs/*.py files return this."""
    from gsm8k_jax.checkpoints.lora import LoraConfig
    from gsm8k_jax.models.registry import model_spec

    model_spec(model_name)
    return ml_collections.ConfigDict(
        {
            "model_family": "Gemma3",
            "model_name": model_name,
            "model_path": "",  # Empty: the model's default source (see registry.MODELS).
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
    if path.startswith("gs://"):
        return "gcs"  # Not hashed: reading it twice is not worth it.
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def run_tag(
    model_name: str,
    lora_path: str,
    batch_size: int,
    lora_config: LoraConfig | None = None,
    task: str = "boxed",
) -> str:
    """The tag naming a run's files:
    `<model>_<checkpoint>[_r<rank>a<alpha>][_<task>]_bs<batch>`.

    Args:
      model_name: a name from `registry.MODELS`.
      lora_path: the resolved LoRA checkpoint, or "" for the base model.
      batch_size: prompts decoded in parallel.
      lora_config: the LoRA's rank and alpha, which change its answers, so
        two runs of one checkpoint with different alphas never share files.
      task: the `--task` preset; named unless it is the default `boxed`.
    """
    adapter = f"_r{lora_config.rank}a{lora_config.alpha:g}" if lora_config else ""
    preset = "" if task == "boxed" else f"_{task}"
    return (
        f"{_slug(model_name)}_{checkpoint_tag(lora_path)}{adapter}{preset}"
        f"_bs{batch_size}"
    )


def run_info(
    model: Mapping[str, Any],
    *,
    model_dir: str | Path,
    lora_path: str,
    data_path: str,
    num_examples: int,
    eval_config: EvalConfig,
) -> dict[str, Any]:
    """What produced a run's results, as `run_<tag>.json` records it.

    The answer extraction is not part of it: every run scores every method.

    Args:
      model: the `--model` config as a dict (`model_config(...).to_dict()`).
      model_dir: the local folder the weights were loaded from.
      lora_path: the resolved LoRA checkpoint, or "" for the base model.
      data_path: the GSM8K file (local or gs://).
      num_examples: how many problems are evaluated.
      eval_config: the evaluation settings.
    """
    from gsm8k_jax.checkpoints.sources import model_revision
    from gsm8k_jax.sampling import batching

    return {
        "model": dict(model),
        "model_dir": str(model_dir),
        "model_revision": model_revision(model_dir),
        "lora_checkpoint": lora_path,
        "data_path": data_path,
        "data_sha256": _file_digest(data_path),
        "num_examples": num_examples,
        # Results are bitwise the same at any batch size for one row tile
        # (the platform's), and a LoRA is merged in float32.
        "row_tile": batching.default_row_tile(),
        "lora_mode": "merged_float32" if lora_path else None,
        "eval": {
            "batch_size": eval_config.batch_size,
            "sampling": {
                **vars(eval_config.sampling),
                "eos_ids": list(eval_config.sampling.eos_ids),
            },
            "prompt_template": eval_config.prompt_template,
            "system_prompt": eval_config.system_prompt,
            "use_chat_template": eval_config.use_chat_template,
            "task": eval_config.task,
        },
    }
