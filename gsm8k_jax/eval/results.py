"""Crash-safe, resumable result files of one evaluation run, local or on gs://.

An output folder (a local folder or `gs://bucket/folder`; see `storage`)
holds, per run tag:
- `run_<tag>.json`: what produced the results (model, checkpoint, settings);
  a rerun with other settings is refused rather than mixed in;
- `chunks_<tag>/`: while the run is in progress, its finished rollouts, one
  small file committed atomically per group of finished sequences (see
  `chunks.py`), so a crash (kill -9 included) loses only sequences in
  flight;
- `rollouts_<tag>.jsonl`: once the run is complete, one line per (example,
  sample), sorted by (id, sample), merged from the chunks (and an earlier
  rollouts file, when a finished run is rerun); the chunks are removed once
  it and the summary are written;
- `summary_<tag>.json`: written at the end from the rollouts alone.

Resuming keeps every example whose samples are all committed and the run
continues with the rest. A (example, sample) committed twice (an example
half finished before a crash is generated again whole) is taken from the
first chunk holding it, in (process, seq) order: the same bits either way,
since generation is batch invariant. A damaged line of the rollouts file is
left out with a warning naming it (`ResultsWarning`): its example counts as
unfinished, so a resumed run generates it again and keeps every other line
as it was. Rows of examples that are not the run's (a chunk of another run)
are left out of its results, with a warning. A run whose record is lost
resumes from the copy its summary holds.

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
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_collections

from gsm8k_jax import stop_signals, storage
from gsm8k_jax.checkpoints.lora_config import LoraConfig
from gsm8k_jax.eval.chunks import (
    ChunkStore,
    DamagedLine,
    json_line,
    parse_rollout_line,
)
from gsm8k_jax.models.specs import model_spec

if TYPE_CHECKING:
    from gsm8k_jax.eval.runner import EvalConfig
    from gsm8k_jax.sampling.params import SamplingParams


class ResultsError(RuntimeError):
    """Result files cannot be written, or do not belong to this run."""


class ResultsWarning(UserWarning):
    """Results were read with part of them left out: a damaged line or
    file, or rows that are not the run's. The scripts print it as one line."""


class DamagedFileError(ValueError):
    """A run's JSON file (`run_<tag>.json`, `summary_<tag>.json`) cannot be read."""

    def __init__(self, path: str, reason: str, advice: str):
        super().__init__(f"{path} is damaged ({reason}): {advice}")
        self.path = path
        self.reason = reason


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
    # Generated: to an eos id, the length limit, or the last token of a stop
    # string the row wrote with its own tokens (`stopping.stop_token_sequences`).
    num_tokens: int
    finish_reason: str  # eos | length | stop (cut at a task's stop string)
    logprob: float


def _json_file(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=2, sort_keys=True) + "\n"


class RunFiles:
    """The files of one run (one tag) inside an output folder, as one
    process (`process_index`, of a multi-host run) writes them."""

    def __init__(self, output_dir: str | os.PathLike, tag: str, process_index: int = 0):
        self.output_dir = os.fspath(output_dir)
        self.tag = tag
        self.process_index = process_index
        self.run_path = storage.join(self.output_dir, f"run_{tag}.json")
        self.rollouts_path = storage.join(self.output_dir, f"rollouts_{tag}.jsonl")
        self.summary_path = storage.join(self.output_dir, f"summary_{tag}.json")
        self.chunks = ChunkStore(
            storage.join(self.output_dir, f"chunks_{tag}"), process_index
        )
        self._warned: set[str] = set()

    def _warn(self, message: str) -> None:
        """Warns once per message and RunFiles: a run reads its files again
        while it waits for the other processes and before it merges."""
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, ResultsWarning, stacklevel=3)

    def prepare(
        self, run_info: dict[str, Any], *, resume: bool, overwrite: bool
    ) -> None:
        """`check`s, then (re)writes the run record; with `overwrite`, first
        removes the run's results. Process 0's work: the other processes of
        a multi-host run only `check`, and wait for process 0."""
        self.check(lambda: run_info, resume=resume, overwrite=overwrite)
        if overwrite:
            for path in (self.rollouts_path, self.summary_path):
                storage.remove(path)
            self.chunks.remove()
        storage.write_atomic(self.run_path, _json_file(run_info))

    def check(
        self,
        run_info: Callable[[], dict[str, Any]],
        *,
        resume: bool,
        overwrite: bool,
    ) -> None:
        """Checks the folder is writable and the files belong to this run.

        Raises before anything is changed, so bad input never damages
        results already written. `run_info()` is called only to compare with
        the results being resumed (it hashes the weights).
        """
        storage.require_writable(self.output_dir)
        # A record without results (a start that failed before its first
        # finished sequence) blocks nothing: it is simply rewritten.
        if self.has_results() and not overwrite:
            if not resume:
                raise ResultsError(
                    f"{self.output_dir} already holds results for run '{self.tag}'. Pass"
                    " --resume to continue them or --overwrite to replace them."
                )
            changed = differing_settings(self._recorded_run_info(), run_info())
            if changed:
                raise ResultsError(
                    f"{self.output_dir} holds results of run '{self.tag}' made with other"
                    f" settings (differing: {', '.join(changed)}). Use another"
                    " --output_dir, or --overwrite to replace them."
                )

    def has_results(self) -> bool:
        """Whether any rollout was committed: a chunk, or a non-empty rollouts file."""
        if self.chunks.names():
            return True
        try:
            return bool(storage.read_bytes(self.rollouts_path).strip())
        except FileNotFoundError:
            return False

    def read_finished(
        self, num_samples: int, example_ids: Collection[int] | None = None
    ) -> list[dict[str, Any]]:
        """Rollouts of fully finished examples: the rollouts file's, then the
        chunks', each (id, sample) once. Changes no file, so it also reads a
        run that is still running or crashed (comparisons do).

        Args:
          num_samples: the samples an example needs to be finished.
          example_ids: the run's examples, when known: rows of other ids
            (a chunk of another run) are left out, with a warning.
        """
        try:
            records = self._parse_rollouts()
        except FileNotFoundError:
            records = []
        unique: dict[tuple[int, int], dict[str, Any]] = {}
        for r in records + self.chunks.records():
            unique.setdefault((r["id"], r["sample_index"]), r)
        rows = list(unique.values())
        if example_ids is not None:
            rows = self._of_examples(rows, example_ids)
        return _finished(rows, num_samples)

    def _of_examples(
        self, rows: list[dict[str, Any]], example_ids: Collection[int]
    ) -> list[dict[str, Any]]:
        """The rows of the run's examples; a warning names the others."""
        strays = sorted({r["id"] for r in rows} - set(example_ids))
        if not strays:
            return rows
        shown = ", ".join(map(str, strays[:5])) + (", ..." if strays[5:] else "")
        self._warn(
            f"{self.output_dir} holds rollouts of {len(strays)} problem(s) that are"
            f" not among the {len(example_ids)} of run '{self.tag}' (ids {shown};"
            " from another run?): they are left out of its results."
        )
        return [r for r in rows if r["id"] in example_ids]

    def read_run_info(self) -> dict[str, Any] | None:
        """The run record (`run_<tag>.json`), or None when there is none."""
        return self._read_json(
            self.run_path,
            "restore it, or evaluate again (--overwrite, or another --output_dir).",
        )

    def read_summary(self) -> dict[str, Any] | None:
        """`summary_<tag>.json`, or None while the run has not finished."""
        return self._read_json(self.summary_path, _REWRITE_SUMMARY, require_dict="run")

    @staticmethod
    def _read_json(
        path: str, advice: str, require_dict: str | None = None
    ) -> dict[str, Any] | None:
        """A JSON object file, or None when there is none; DamagedFileError
        when it is not a JSON object (with a `require_dict` object in it)."""
        try:
            text = storage.read_text(path)
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            reason = f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
            raise DamagedFileError(path, reason, advice) from e
        if not isinstance(record, dict):
            reason = f"a JSON {type(record).__name__}, not an object"
            raise DamagedFileError(path, reason, advice)
        if require_dict and not isinstance(record.get(require_dict), dict):
            raise DamagedFileError(path, f"no '{require_dict}' object in it", advice)
        return record

    def _recorded_run_info(self) -> dict[str, Any]:
        """What produced the results in the folder: the run record, else the
        copy a finished run's summary holds of it.

        Raises:
          ResultsError: neither is there.
          DamagedFileError: the run record is damaged and there is no summary.
        """
        try:
            record = self.read_run_info()
        except DamagedFileError:
            record, damaged = None, True
        else:
            damaged = False
        if record is not None:
            return record
        try:
            summary = self.read_summary()
        except DamagedFileError:
            summary = None
        if summary is not None:
            return summary["run"]
        if damaged:
            self.read_run_info()  # Raises, naming the damage.
        raise ResultsError(
            f"{self.output_dir} holds results of run '{self.tag}' but not its run"
            f" record {storage.basename(self.run_path)}, which says what settings"
            " produced them, so they cannot be resumed: restore it, or use another"
            " --output_dir (--overwrite deletes the results)."
        )

    def _parse_rollouts(self) -> list[dict[str, Any]]:
        """The rollouts file's records. A damaged line is left out with a
        warning naming it: its example then counts as unfinished (a resumed
        run generates it again, and keeps every other line). A final line
        cut short of its newline (an interrupted append, by versions that
        appended to the file) is left out silently."""
        lines = _lines(storage.read_text(self.rollouts_path))
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue  # A blank line (an editor's) holds no rollout.
            try:
                records.append(parse_rollout_line(line.removesuffix("\n")))
            except DamagedLine as e:
                if number == len(lines) and not line.endswith("\n"):
                    continue  # Torn final line from an interrupted write.
                self._warn(
                    f"{self.rollouts_path}, line {number} is damaged ({e}) and left"
                    " out: its problem counts as unfinished, and resuming the run"
                    " generates it again and keeps every other line."
                )
        return records

    def append(self, rollouts: Iterable[Rollout]) -> None:
        """Commits one group of finished rollouts as a chunk."""
        self.chunks.commit([dataclasses.asdict(r) for r in rollouts])

    def write_rollouts(self, records: Iterable[dict[str, Any]]) -> None:
        """Replaces the rollouts file with `records` in (id, sample) order:
        sequences finish out of order, but the finished file is the same
        however the run went."""
        records = sorted(records, key=lambda r: (r["id"], r["sample_index"]))
        with stop_signals.finishing_write():
            storage.write_atomic(self.rollouts_path, "".join(map(json_line, records)))

    def read_rollouts(self) -> list[dict[str, Any]]:
        """The rollouts file's records (of a finished run)."""
        return [
            json.loads(line) for line in _lines(storage.read_text(self.rollouts_path))
        ]

    def write_summary(self, summary: dict[str, Any]) -> None:
        with stop_signals.finishing_write():
            storage.write_atomic(self.summary_path, _json_file(summary))

    def remove_chunks(self) -> None:
        """Removes the chunks, once the rollouts file holds all they held."""
        self.chunks.remove()


# How to mend a damaged summary: the rollouts are all it is made from.
_REWRITE_SUMMARY = (
    "rerun the evaluation's command to write it again from the rollouts (nothing"
    " is generated again)."
)


def _lines(text: str) -> list[str]:
    """A JSON Lines text's lines, each with its newline (the last may lack
    it). Split at newlines alone: a response may hold other line breaks
    (U+2028, U+0085), which JSON writes unescaped and str.splitlines splits at."""
    lines = text.split("\n")
    return [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])


def _finished(records: list[dict[str, Any]], num_samples: int) -> list[dict[str, Any]]:
    """The records of examples with all `num_samples` samples, in their order."""
    counts: dict[int, int] = {}
    for r in records:
        counts[r["id"]] = counts.get(r["id"], 0) + 1
    return [r for r in records if counts[r["id"]] == num_samples]


# Sampling settings greedy decoding never reads: a greedy run records them
# as null (`without_greedy_unused`), and they never tell two greedy runs
# apart.
_GREEDY_UNUSED = ("seed", "top_k", "top_p")
_UNUSED_WHEN_GREEDY = tuple(f"eval.sampling.{name}" for name in _GREEDY_UNUSED)
# Settings recorded since a later version: an older record does not say
# what its run used (None), so a resume does not compare them, and a
# comparison pairs such a run with none that records them.
_SETTINGS_ADDED_LATER = ("mesh_model",)


def with_later_settings(record: dict[str, Any]) -> dict[str, Any]:
    """A run record with the settings it predates as None (unknown)."""
    return dict.fromkeys(_SETTINGS_ADDED_LATER) | record


def differing_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted names of the settings that differ, e.g. `eval.sampling.seed`;
    between two greedy runs, not those greedy decoding never reads."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        out = {}
        for key, value in d.items():
            out |= flat(value, f"{prefix}.{key}" if prefix else str(key))
        return out

    a, b = flat(old), flat(new)
    greedy = (
        a.get("eval.sampling.temperature") == 0 == b.get("eval.sampling.temperature")
    )
    ignored = _UNUSED_WHEN_GREEDY if greedy else ()
    ignored += tuple(k for k in _SETTINGS_ADDED_LATER if k not in a or k not in b)
    if "gcs" in (a.get("data_sha256"), b.get("data_sha256")):
        ignored += ("data_sha256",)  # An older record: gs:// data unhashed.
    return sorted(
        k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in ignored
    )


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
) -> str:
    """The tag naming a run's files:
    `<model>_<checkpoint>[_r<rank>a<alpha>][_<task>]_bs<batch>`.

    Args:
      model_name: a name from `specs.MODELS`.
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
    mesh_model: int = 1,
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
      data_path: the GSM8K file (local or gs://).
      num_examples: how many problems are evaluated.
      eval_config: the evaluation settings.
      mesh_model: devices per tensor-parallel group (`--mesh_model`): it
        splits reductions, so it can change the last bits of a result.
    """
    from gsm8k_jax.checkpoints.sources import model_revision
    from gsm8k_jax.sampling import batching

    if lora_path:  # Orbax is imported for LoRA runs alone.
        from gsm8k_jax.checkpoints.lora_checkpoint import resolve_trained_lora

        trained = resolve_trained_lora(
            lora_path, LoraConfig(**model["lora_config"]), given=()
        )
        lora_path = trained.params_path
        model = {**model, "lora_config": dataclasses.asdict(trained.config)}
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
        "lora_mode": "attached" if lora_path else None,
        # Every projection accumulates in float32 and rounds once. Records
        # without it were made otherwise (their bfloat16 results differ), so
        # they are neither resumed nor compared as the same settings.
        "projection_accumulation": "float32",
        "eval": {
            "batch_size": eval_config.batch_size,
            "sampling": _sampling_record(eval_config.sampling),
            "prompt_template": eval_config.prompt_template,
            "system_prompt": eval_config.system_prompt,
            "use_chat_template": eval_config.use_chat_template,
            "task": eval_config.task,
        },
    }


def _sampling_record(sampling: SamplingParams) -> dict[str, Any]:
    return without_greedy_unused({**vars(sampling), "eos_ids": list(sampling.eos_ids)})


def without_greedy_unused(sampling: dict[str, Any]) -> dict[str, Any]:
    """A run record's sampling settings, with those a greedy run never reads
    as null (older records hold the flags' values)."""
    if sampling["temperature"] == 0:
        return sampling | dict.fromkeys(_GREEDY_UNUSED)
    return sampling
