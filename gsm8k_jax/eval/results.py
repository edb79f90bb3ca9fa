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
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class ResultsError(RuntimeError):
    """Result files cannot be written, or do not belong to this run."""


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One generated answer to one GSM8K problem, with its score."""

    id: int
    sample_index: int
    question: str
    gold: str
    prompt: str
    response: str
    extracted_answer: str | None
    correct: bool
    num_tokens: int
    finish_reason: str
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
        counts: dict[int, int] = {}
        for r in records:
            counts[r["id"]] = counts.get(r["id"], 0) + 1
        kept = [r for r in records if counts[r["id"]] == num_samples]
        if len(kept) != len(lines):
            _write_atomically(self.rollouts_path, "".join(_json_line(r) for r in kept))
        return kept

    def append(self, rollouts: Iterable[Rollout]) -> None:
        """Appends one batch in a single write, then fsyncs."""
        text = "".join(_json_line(dataclasses.asdict(r)) for r in rollouts)
        with open(self.rollouts_path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def sort_rollouts(self) -> None:
        """Puts the rollouts in (id, sample) order: sequences finish out of
        order, but the finished file is the same however the run went."""
        self.write_rollouts(self.read_rollouts())

    def write_rollouts(self, records: Iterable[dict[str, Any]]) -> None:
        """Replaces the rollouts file with `records` in (id, sample) order."""
        records = sorted(records, key=lambda r: (r["id"], r["sample_index"]))
        _write_atomically(self.rollouts_path, "".join(_json_line(r) for r in records))

    def read_rollouts(self) -> list[dict[str, Any]]:
        with open(self.rollouts_path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def write_summary(self, summary: dict[str, Any]) -> None:
        _write_atomically(
            self.summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n"
        )


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
