"""Crash-safe, resumable result files of one evaluation run, local or on gs://.

An output folder (a local folder or `gs://bucket/folder`; see `storage`)
holds, per run tag:
- `run_<tag>.json`: what produced the results (model, checkpoint, settings);
  a rerun with other settings is refused rather than mixed in, except that
  a rerun on more problems (`num_examples`) extends the run;
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
`run_record.py`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Collection, Iterable
from typing import Any

from gsm8k_jax import stop_signals, storage
from gsm8k_jax.eval import run_lock, run_record
from gsm8k_jax.eval.chunks import (
    ChunkStore,
    DamagedLine,
    json_line,
    jsonl_lines,
    parse_rollout_line,
)
from gsm8k_jax.eval.run_record import differing_settings

# Names defined here until 2026-12-07, now in run_record.py: configs written
# then (`--model=my_config.py`) import them from here.
_MOVED_TO_RUN_RECORD = ("model_config", "run_info", "run_tag")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_RUN_RECORD:
        return getattr(run_record, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        extends = self.check(lambda: run_info, resume=resume, overwrite=overwrite)
        if overwrite:
            for path in (self.rollouts_path, self.summary_path):
                storage.remove(path)
            self.chunks.remove()
        elif extends:
            # It summarised fewer problems: until the run ends, it is not finished.
            storage.remove(self.summary_path)
        storage.write_atomic(self.run_path, _json_file(run_info))

    def check(
        self,
        run_info: Callable[[], dict[str, Any]],
        *,
        resume: bool,
        overwrite: bool,
    ) -> bool:
        """Checks the folder is writable, no other process is running this
        run there (`run_lock`; this process holds the run until `release`),
        and the files belong to this run; returns whether they go on to more
        problems than the run was started with (`num_examples`).

        Raises before any result is changed, so bad input never damages
        results already written (and then holds no lock it took). `run_info()`
        is called only to compare with the results being resumed (it hashes
        the weights).
        """
        storage.require_writable(self.output_dir)
        took = run_lock.acquire(self.output_dir, self.tag, self.process_index)
        try:
            return self._check_results(run_info, resume=resume, overwrite=overwrite)
        except BaseException:
            if took:
                self.release()
            raise

    def _check_results(
        self, run_info: Callable[[], dict[str, Any]], *, resume: bool, overwrite: bool
    ) -> bool:
        # A record without results (a start that failed before its first
        # finished sequence) blocks nothing: it is simply rewritten.
        if self.has_results() and not overwrite:
            if not resume:
                raise ResultsError(
                    f"{self.output_dir} already holds results for run '{self.tag}'. Pass"
                    " --resume to continue them or --overwrite to replace them."
                )
            recorded, wanted = self._recorded_run_info(), run_info()
            changed = differing_settings(recorded, wanted)
            if changed == ["num_examples"]:
                self._check_more_problems(
                    recorded["num_examples"], wanted["num_examples"]
                )
                return True
            if changed:
                raise ResultsError(
                    f"{self.output_dir} holds results of run '{self.tag}' made with other"
                    f" settings (differing: {', '.join(changed)}). Use another"
                    " --output_dir, or --overwrite to replace them."
                )
        return False

    def _check_more_problems(self, recorded: int, wanted: int) -> None:
        """A run goes on to more problems than it was started with, keeping
        those it finished: a problem's results do not depend on which others
        run beside it (its own prompt alone decides them, tested bitwise).
        Fewer would leave finished results out of the run's files: refused."""
        if wanted < recorded:
            raise ResultsError(
                f"{self.output_dir} holds results of run '{self.tag}' on its first"
                f" {recorded} problems; {wanted} would leave some out: pass"
                f" --num_examples={recorded} or more (more extends the run), or use"
                " another --output_dir."
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
        lines = jsonl_lines(storage.read_text(self.rollouts_path))
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
        """Commits one group of finished rollouts as a chunk (refused where
        another process took the run over: `run_lock.check_held`)."""
        run_lock.check_held(self.output_dir, self.tag, self.process_index)
        self.chunks.commit([dataclasses.asdict(r) for r in rollouts])

    def write_rollouts(self, records: Iterable[dict[str, Any]]) -> None:
        """Replaces the rollouts file with `records` in (id, sample) order:
        sequences finish out of order, but the finished file is the same
        however the run went."""
        records = sorted(records, key=lambda r: (r["id"], r["sample_index"]))
        run_lock.check_held(self.output_dir, self.tag, self.process_index)
        with stop_signals.finishing_write():
            storage.write_atomic(self.rollouts_path, "".join(map(json_line, records)))

    def read_rollouts(self) -> list[dict[str, Any]]:
        """The rollouts file's records (of a finished run; a damaged line is
        left out with a warning, as when resuming)."""
        return self._parse_rollouts()

    def write_summary(self, summary: dict[str, Any]) -> None:
        with stop_signals.finishing_write():
            storage.write_atomic(self.summary_path, _json_file(summary))

    def remove_chunks(self) -> None:
        """Removes the chunks, once the rollouts file holds all they held."""
        self.chunks.remove()

    def release(self) -> None:
        """Lets another process run this run (`check` took it for this one)."""
        run_lock.release(self.output_dir, self.tag, self.process_index)


# How to mend a damaged summary: the rollouts are all it is made from.
_REWRITE_SUMMARY = (
    "rerun the evaluation's command to write it again from the rollouts (nothing"
    " is generated again)."
)


def _finished(records: list[dict[str, Any]], num_samples: int) -> list[dict[str, Any]]:
    """The records of examples with all `num_samples` samples, in their order."""
    counts: dict[int, int] = {}
    for r in records:
        counts[r["id"]] = counts.get(r["id"], 0) + 1
    return [r for r in records if counts[r["id"]] == num_samples]
