"""Reading evaluation runs back for comparison, finished or not.

A run is the files `evaluate` writes for one tag (`rollouts_<tag>.jsonl`,
or `chunks_<tag>/` while it runs, `summary_<tag>.json`, `run_<tag>.json`;
see `results.RunFiles`), in a local folder or on `gs://`. Reading a run
never changes its files, so a run still in progress, or one that crashed,
can be read too: it is then marked incomplete (`RunResult.complete`) so
that a comparison does not report it as if it had finished. A damaged
summary is read past, with a warning: the run is compared from its
rollouts, as every comparison scores them again anyway.

Needs neither jax nor a model.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import warnings
from typing import Any

from gsm8k_jax import storage
from gsm8k_jax.eval.results import DamagedFileError, ResultsWarning, RunFiles
from gsm8k_jax.eval.tasks import BOXED

__all__ = ["RunResult", "load_run", "load_run_files", "load_runs"]

_FILE_NAME = re.compile(
    r"(?:rollouts_(?P<rollouts>.+)\.jsonl|(?:summary|run)_(?P<json>.+)\.json)"
)
_RESULTS_NAME = re.compile(r"rollouts_(?P<tag>.+)\.jsonl|chunks_(?P<chunks>.+)")


@dataclasses.dataclass(frozen=True)
class RunResult:
    """The results of one evaluation run, as read from its files.

    Attributes:
      tag: the run tag, e.g. `gemma3-1b-it_base_bs32`.
      model_name: the evaluated model, e.g. `gemma3-1b-it`.
      checkpoint: the resolved LoRA checkpoint, or "" for the base model.
      batch_size: prompts decoded in parallel.
      num_samples: samples drawn per question (k).
      rollouts: one dict per (example, sample) of every finished example,
        sorted by (id, sample_index); see `results.Rollout` for the keys.
      summary: the contents of `summary_<tag>.json`, or None while the run
        has not finished.
      run_info: the settings that produced the run (`run_<tag>.json`).
      source: the folder holding the run's files.
      summary_damaged: `summary_<tag>.json` is there but cannot be read
        (summary is then None): the run got as far as writing it.
    """

    tag: str
    model_name: str
    checkpoint: str
    batch_size: int
    num_samples: int
    rollouts: list[dict[str, Any]]
    summary: dict[str, Any] | None
    run_info: dict[str, Any]
    source: str
    summary_damaged: bool = False

    @property
    def task(self) -> str:
        """The `--task` of the run (runs from before tasks existed: `boxed`)."""
        return self.run_info["eval"].get("task", BOXED)

    @property
    def num_examples(self) -> int:
        """The problems the run was started on (its run record's count)."""
        return self.run_info["num_examples"]

    @property
    def num_finished(self) -> int:
        """The problems with all their samples on disk."""
        return len({r["id"] for r in self.rollouts})

    @property
    def complete(self) -> bool:
        """Whether the run finished: it has its summary (a damaged one
        counts: it is written last) and every problem it was started on. An
        incomplete run's accuracy covers only the problems it finished,
        which need not be a fair sample of the rest."""
        has_summary = self.summary is not None or self.summary_damaged
        return has_summary and self.num_finished >= self.num_examples

    def by_question(self) -> list[list[dict[str, Any]]]:
        """The rollouts grouped per example id (in id order), each group in
        sample order."""
        ordered = sorted(self.rollouts, key=lambda r: (r["id"], r["sample_index"]))
        return [
            list(group)
            for _, group in itertools.groupby(ordered, key=lambda r: r["id"])
        ]


def _tags_in(folder: str) -> list[str]:
    """The tags of the runs with results in `folder`: a rollouts file, or chunks."""
    matches = (_RESULTS_NAME.fullmatch(n) for n in storage.list_names(folder))
    return sorted({m["tag"] or m["chunks"] for m in matches if m})


def load_run_files(files: RunFiles) -> RunResult:
    """The run whose files `files` names, finished or not.

    A damaged summary is read past with a warning (`ResultsWarning`): the
    run is compared from its rollouts and run record. So is a damaged
    rollouts line (its problem counts as unfinished).

    Raises:
      FileNotFoundError: the run has no rollouts, or no record of what
        produced them (neither summary nor run record).
      ValueError: no example has all its samples yet, or the summary is
        damaged and the run record missing or damaged too.
    """
    if not (storage.exists(files.rollouts_path) or files.chunks.names()):
        raise FileNotFoundError(
            f"{files.rollouts_path} not found: run '{files.tag}' has no rollouts."
        )
    damage = None
    try:
        summary = files.read_summary()
    except DamagedFileError as e:
        summary, damage = None, e
    run_info = summary["run"] if summary is not None else files.read_run_info()
    if damage is not None:
        record = storage.basename(files.run_path)
        if run_info is None:
            raise ValueError(
                f"{damage.path} is damaged ({damage.reason}) and {record} is missing:"
                f" nothing says what produced the rollouts of run '{files.tag}'. Rerun"
                " its evaluation command to write both again (nothing is generated"
                " again), or restore them."
            ) from damage
        warnings.warn(
            f"{damage.path} is damaged ({damage.reason}): run '{files.tag}' is"
            f" compared from its rollouts and {record} (rerunning its evaluation"
            " command writes the summary again without generating).",
            ResultsWarning,
            stacklevel=2,
        )
    if run_info is None:
        raise FileNotFoundError(
            f"{files.output_dir} has rollouts of run '{files.tag}' but neither"
            f" {storage.basename(files.summary_path)} nor"
            f" {storage.basename(files.run_path)}, which say what"
            " produced them."
        )
    try:
        num_samples = run_info["eval"]["sampling"]["num_samples"]
        model_name = run_info["model"]["model_name"]
        checkpoint = run_info["lora_checkpoint"]
        batch_size = run_info["eval"]["batch_size"]
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"The record of run '{files.tag}' in {files.output_dir} lacks {e}:"
            " it was not written by this project's scripts or with a run record"
            " from gsm8k_jax.run_info(...), so it cannot be compared."
        ) from e
    rollouts = sorted(
        files.read_finished(num_samples), key=lambda r: (r["id"], r["sample_index"])
    )
    if not rollouts:
        raise ValueError(
            f"{files.rollouts_path} holds no finished example yet (each needs"
            f" {num_samples} sample(s))."
        )
    return RunResult(
        tag=files.tag,
        model_name=model_name,
        checkpoint=checkpoint,
        batch_size=batch_size,
        num_samples=num_samples,
        rollouts=rollouts,
        summary=summary,
        run_info=run_info,
        source=files.output_dir,
        summary_damaged=damage is not None,
    )


def load_runs(path: str | os.PathLike) -> list[RunResult]:
    """Every run in a results folder (one per tag), sorted by tag.

    Args:
      path: a results folder, or one of a run's files (then that run only).

    Raises:
      FileNotFoundError: the path does not exist, or the folder holds no
        `rollouts_<tag>.jsonl` file.
      ValueError: a rollouts file holds no finished example, or a run's
        summary and run record are both missing or damaged.
    """
    folder = os.fspath(path)
    if not storage.exists(folder):
        raise FileNotFoundError(f"Results path not found: {folder}.")
    if storage.is_file(folder):
        return [load_run(folder)]
    tags = _tags_in(folder)
    if not tags:
        found = storage.list_names(folder)[:10]
        raise FileNotFoundError(
            f"No results in {folder}: expected rollouts_<tag>.jsonl files as the"
            " eval_gsm8k scripts write them, but "
            + (f"it holds {found}." if found else "it is empty.")
        )
    return [load_run_files(RunFiles(folder, tag)) for tag in tags]


def load_run(path: str | os.PathLike) -> RunResult:
    """One run, from its results folder or from one of its files.

    Args:
      path: `rollouts_<tag>.jsonl`, `summary_<tag>.json` or `run_<tag>.json`,
        or a folder holding a single run.

    Raises:
      FileNotFoundError: the path or the run's rollouts do not exist.
      ValueError: the file name is not a run file, the folder holds several
        runs (use `load_runs`), or the rollouts are empty.
    """
    path = os.fspath(path)
    if storage.is_file(path):
        match = _FILE_NAME.fullmatch(storage.basename(path))
        if match is None:
            raise ValueError(
                f"{path} is not a results file: expected rollouts_<tag>.jsonl,"
                " summary_<tag>.json or run_<tag>.json."
            )
        tag = match["rollouts"] or match["json"]
        return load_run_files(RunFiles(storage.parent(path), tag))
    if not storage.exists(path):
        raise FileNotFoundError(f"Results path not found: {path}.")
    tags = _tags_in(path)
    if len(tags) > 1:
        raise ValueError(
            f"{path} holds {len(tags)} runs ({', '.join(tags)}): pass one of their"
            " files, or use load_runs."
        )
    return load_runs(path)[0]
