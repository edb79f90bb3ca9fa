"""Which checkpoint is better? Comparing GSM8K runs honestly.

`compare_runs` computes, from runs `runs.load_runs` read:

* accuracy with a 95% interval per run, and whether the run finished (an
  incomplete run is marked, never passed off as finished);
* for each run against a baseline, on the problems both finished (paired by
  example id), the difference with a paired bootstrap interval, the exact
  McNemar test with its verdict at the 5% level, and the problems they
  disagree on;
* whether runs that differ only in batch size gave the same responses;
* with several samples per question, pass@k, maj@k, clustered mean accuracy
  and reranking (`multi_sample`).

`report` renders the result. Needs neither jax nor a model.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from gsm8k_jax.eval import report as report_lib
from gsm8k_jax.eval import stats
from gsm8k_jax.eval.extraction import EXTRACTION_METHODS
from gsm8k_jax.eval.multi_sample import (
    MultiSampleMetrics,
    correct_grid,
    multi_sample_metrics,
)
from gsm8k_jax.eval.run_record import (
    differing_settings,
    with_later_settings,
    without_greedy_unused,
)
from gsm8k_jax.eval.runs import RunResult
from gsm8k_jax.eval.scoring import rescore
from gsm8k_jax.eval.tasks import get_task

__all__ = [
    "Answer",
    "BatchConsistency",
    "ComparisonReport",
    "Disagreement",
    "PairedComparison",
    "RunRow",
    "compare_runs",
]

# A difference is called significant when McNemar's p is below this; the
# intervals have the matching confidence.
SIGNIFICANCE_LEVEL = 0.05
CONFIDENCE = 1 - SIGNIFICANCE_LEVEL


@dataclasses.dataclass(frozen=True)
class RunRow:
    """One run in the accuracy table.

    `accuracy` is over all (question, sample) rows of the finished problems.
    Its interval is Wilson's with one sample per question, and with k > 1
    Wilson's on the items the samples are worth, clustered by question
    (`stats.clustered_accuracy_interval`). `complete` is False while the run
    has fewer finished problems (`num_finished`) than it was started on
    (`num_examples`) or no summary.
    """

    index: int
    tag: str
    model_name: str
    checkpoint: str
    batch_size: int
    num_samples: int
    num_examples: int
    num_finished: int
    complete: bool
    correct: int
    total: int
    accuracy: float
    accuracy_ci95: tuple[float, float]
    interval: str  # "wilson" or "clustered"
    source: str
    # The weights' folder when given (--model.model_path), else "": a base
    # run of fine-tuned weights is told apart from the named model's.
    model_path: str = ""


@dataclasses.dataclass(frozen=True)
class Answer:
    """One run's answer to a problem."""

    response: str
    extracted_answer: str | None
    correct: bool


@dataclasses.dataclass(frozen=True)
class Disagreement:
    """A problem that exactly one of two runs got right."""

    id: int
    question: str
    gold: str
    baseline: Answer
    candidate: Answer


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """A run against the baseline on the problems both finished.

    Attributes:
      baseline: index of the baseline run.
      candidate: index of the compared run.
      num_common: problems paired by id (and identical question text).
      baseline_unpaired: problems only the baseline finished (the candidate
        is incomplete, or ran on other problems); left out of the pairing.
      candidate_unpaired: problems only the candidate finished; left out.
      question_mismatches: ids both runs have but with different questions
        (runs on other data files); left out of the pairing.
      baseline_accuracy: baseline accuracy on the paired problems.
      candidate_accuracy: candidate accuracy on the paired problems.
      difference: candidate - baseline, with a paired bootstrap interval;
        None when no problem is paired.
      mcnemar: exact McNemar test; `b` counts problems only the baseline
        got right, `c` those only the candidate got right.
      significant: whether McNemar's p is below the report's significance
        level; None when no problem is paired.
      significant_holm: whether it stays significant at that level with
        Holm's correction for every comparison of the report (several runs
        each tested against one baseline: by chance alone, one in twenty
        passes at 5%); the same as `significant` with one comparison.
      baseline_only_correct: ids of the `b` problems.
      candidate_only_correct: ids of the `c` problems.
      disagreements: the `b` and `c` problems in id order, to read.
      first_sample_only: True when either run drew several samples per
        question; the pairing then uses sample 0 of each.
      mean_difference: then also, over all samples: the difference of each
        question's share of correct samples (this run − baseline), with a
        paired bootstrap interval over the questions; None otherwise.
      differing_settings: dotted names of the run-record settings in which
        the two runs differ besides the checkpoint, the batch size and where
        their files were (e.g. `eval.sampling.max_generation_steps`): their
        difference is then not the checkpoint's alone.
    """

    baseline: int
    candidate: int
    num_common: int
    baseline_unpaired: int
    candidate_unpaired: int
    question_mismatches: list[int]
    baseline_accuracy: float | None
    candidate_accuracy: float | None
    difference: stats.BootstrapResult | None
    mcnemar: stats.McNemarResult | None
    significant: bool | None
    significant_holm: bool | None
    baseline_only_correct: list[int]
    candidate_only_correct: list[int]
    disagreements: list[Disagreement]
    first_sample_only: bool
    mean_difference: stats.BootstrapResult | None
    differing_settings: list[str]


@dataclasses.dataclass(frozen=True)
class BatchConsistency:
    """Two runs with the same model, checkpoint and settings except batch size.

    Rows are matched by (example id, sample index). Decoding does not depend
    on batch size, so both shares should be 1.
    """

    runs: tuple[int, int]
    batch_sizes: tuple[int, int]
    num_rows: int
    identical_responses: int
    identical_correctness: int
    identical_responses_share: float | None
    identical_correctness_share: float | None


@dataclasses.dataclass(frozen=True)
class ComparisonReport:
    """The comparison of several runs; see `compare_runs`."""

    runs: list[RunRow]
    baseline: int
    paired: list[PairedComparison]
    consistency: list[BatchConsistency]
    multi_sample: list[MultiSampleMetrics]
    extraction_method: str
    num_resamples: int
    seed: int
    significance_level: float

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-serialisable dict (disagreements in full)."""
        return dataclasses.asdict(self)

    def to_markdown(self, max_disagreements: int = 5) -> str:
        """The report as Markdown.

        Args:
          max_disagreements: per compared run, how many disagreeing problems
            to print with their responses (all their ids are listed).
        """
        return report_lib.render_markdown(self, max_disagreements)


def _rescored(run: RunResult, method: str) -> RunResult:
    """`run` with its rollouts scored again from their responses."""
    task = get_task(run.task)
    return dataclasses.replace(run, rollouts=rescore(run.rollouts, method, task))


def _run_row(index: int, run: RunResult) -> RunRow:
    grid = correct_grid(run)
    correct, total = int(grid.sum()), grid.size
    interval, method = stats.grid_accuracy_interval(grid, CONFIDENCE)
    return RunRow(
        index=index,
        tag=run.tag,
        model_name=run.model_name,
        checkpoint=run.checkpoint,
        model_path=run.run_info["model"].get("model_path") or "",
        batch_size=run.batch_size,
        num_samples=run.num_samples,
        num_examples=run.num_examples,
        num_finished=run.num_finished,
        complete=run.complete,
        correct=correct,
        total=total,
        accuracy=correct / total,
        accuracy_ci95=tuple(interval),
        interval=method,
        source=run.source,
    )


def _first_samples(run: RunResult) -> dict[int, dict[str, Any]]:
    return {r["id"]: r for r in run.rollouts if r["sample_index"] == 0}


def _question_shares(run: RunResult, ids: Sequence[int]) -> list[float]:
    """Each question's share of correct samples, in the order of `ids`."""
    shares = {
        group[0]["id"]: float(np.mean([bool(r["correct"]) for r in group]))
        for group in run.by_question()
    }
    return [shares[i] for i in ids]


def _answer(rollout: dict[str, Any]) -> Answer:
    return Answer(
        response=rollout["response"],
        extracted_answer=rollout["extracted_answer"],
        correct=bool(rollout["correct"]),
    )


def _paired(
    runs: Sequence[RunResult],
    baseline: int,
    candidate: int,
    num_resamples: int,
    seed: int,
) -> PairedComparison:
    a, b = _first_samples(runs[baseline]), _first_samples(runs[candidate])
    common = sorted(a.keys() & b.keys())
    mismatches = [i for i in common if a[i]["question"] != b[i]["question"]]
    ids = [i for i in common if a[i]["question"] == b[i]["question"]]
    a_correct = np.array([bool(a[i]["correct"]) for i in ids], dtype=bool)
    b_correct = np.array([bool(b[i]["correct"]) for i in ids], dtype=bool)
    disagreements = [
        Disagreement(
            id=i,
            question=a[i]["question"],
            gold=a[i]["gold"],
            baseline=_answer(a[i]),
            candidate=_answer(b[i]),
        )
        for i, x, y in zip(ids, a_correct, b_correct)
        if x != y
    ]
    mcnemar = stats.mcnemar_exact(a_correct, b_correct) if ids else None
    several = max(runs[baseline].num_samples, runs[candidate].num_samples) > 1
    return PairedComparison(
        baseline=baseline,
        candidate=candidate,
        num_common=len(ids),
        baseline_unpaired=len(a.keys() - b.keys()),
        candidate_unpaired=len(b.keys() - a.keys()),
        question_mismatches=mismatches,
        baseline_accuracy=float(a_correct.mean()) if ids else None,
        candidate_accuracy=float(b_correct.mean()) if ids else None,
        difference=(
            stats.paired_bootstrap_diff(
                a_correct, b_correct, num_resamples, CONFIDENCE, seed
            )
            if ids
            else None
        ),
        mcnemar=mcnemar,
        significant=None if mcnemar is None else mcnemar.p_value < SIGNIFICANCE_LEVEL,
        significant_holm=None,  # Known once every run is paired (`_with_holm`).
        baseline_only_correct=[d.id for d in disagreements if d.baseline.correct],
        candidate_only_correct=[d.id for d in disagreements if d.candidate.correct],
        disagreements=disagreements,
        first_sample_only=several,
        mean_difference=(
            stats.paired_bootstrap_diff(
                _question_shares(runs[baseline], ids),
                _question_shares(runs[candidate], ids),
                num_resamples,
                CONFIDENCE,
                seed,
            )
            if several and ids
            else None
        ),
        differing_settings=_setting_differences(runs[baseline], runs[candidate]),
    )


# Run-record settings that name what is compared or where files were, or
# that results do not depend on (batch size; the problems finished are
# paired and reported on their own).
_NOT_COMPARED_SETTINGS = (
    "lora_checkpoint",
    "model.lora_checkpoint_path",
    "model.model_path",
    "model_dir",
    "data_path",
    "num_examples",
    "eval.batch_size",
    "eval.extraction_method",
)


def _setting_differences(baseline: RunResult, candidate: RunResult) -> list[str]:
    """The settings two runs differ in besides the checkpoint (see
    `PairedComparison.differing_settings`)."""
    a, b = baseline.run_info, candidate.run_info
    both_lora = bool(a.get("lora_checkpoint")) and bool(b.get("lora_checkpoint"))
    return [
        name
        for name in differing_settings(a, b)
        if name not in _NOT_COMPARED_SETTINGS
        and not name.startswith("model.lora_config.")
        and (both_lora or name != "lora_mode")
    ]


def _settings_key(run: RunResult) -> str:
    """What determines a run's responses, except its batch size and where its
    files were (model folder, data file when its digest is known)."""
    info = with_later_settings(copy.deepcopy(run.run_info))
    del info["eval"]["batch_size"]
    info["eval"]["sampling"] = without_greedy_unused(info["eval"]["sampling"])
    # Older run records hold it; every run is scored again under one method.
    info["eval"].pop("extraction_method", None)
    info.pop("model_dir", None)
    info.pop("num_examples", None)
    if info.get("data_sha256") != "gcs":  # (Older records: gs:// data unhashed.)
        info.pop("data_path", None)
    return json.dumps(info, sort_keys=True)


def _with_holm(paired: list[PairedComparison]) -> list[PairedComparison]:
    """`paired` with each verdict corrected for all of them (Holm)."""
    tested = [p for p in paired if p.mcnemar is not None]
    rejected = stats.holm_rejections(
        [p.mcnemar.p_value for p in tested], SIGNIFICANCE_LEVEL
    )
    holm = {p.candidate: r for p, r in zip(tested, rejected, strict=True)}
    return [
        dataclasses.replace(p, significant_holm=holm.get(p.candidate)) for p in paired
    ]


def _consistency(runs: Sequence[RunResult], i: int, j: int) -> BatchConsistency:
    rows_i = {(r["id"], r["sample_index"]): r for r in runs[i].rollouts}
    rows_j = {(r["id"], r["sample_index"]): r for r in runs[j].rollouts}
    common = sorted(rows_i.keys() & rows_j.keys())
    same_response = sum(rows_i[k]["response"] == rows_j[k]["response"] for k in common)
    same_correct = sum(
        bool(rows_i[k]["correct"]) == bool(rows_j[k]["correct"]) for k in common
    )
    return BatchConsistency(
        runs=(i, j),
        batch_sizes=(runs[i].batch_size, runs[j].batch_size),
        num_rows=len(common),
        identical_responses=same_response,
        identical_correctness=same_correct,
        identical_responses_share=same_response / len(common) if common else None,
        identical_correctness_share=same_correct / len(common) if common else None,
    )


def _baseline_index(runs: Sequence[RunResult], baseline: int | str | None) -> int:
    if baseline is None:
        # The base model's run that finished the most problems (else any
        # run's), the first of equals.
        return max(
            range(len(runs)),
            key=lambda i: (not runs[i].checkpoint, runs[i].num_finished, -i),
        )
    return check_baseline([r.tag for r in runs], baseline)


def check_baseline(tags: Sequence[str], baseline: int | str) -> int:
    """The index of the baseline among runs of these tags (in order), by
    index or tag; a clear error when it names none (so a sweep can check it
    before evaluating anything)."""
    if isinstance(baseline, str):
        matches = [i for i, tag in enumerate(tags) if tag == baseline]
        if len(matches) != 1:
            found = "no run has" if not matches else f"runs {matches} have"
            raise ValueError(
                f"Baseline {baseline!r}: {found} that tag; tags:"
                f" {list(tags)}. Give the baseline's index instead."
            )
        return matches[0]
    if not 0 <= baseline < len(tags):
        raise ValueError(
            f"Baseline index {baseline} out of range for {len(tags)} runs."
        )
    return baseline


def compare_runs(
    runs: Sequence[RunResult],
    baseline: int | str | None = None,
    num_resamples: int = 10_000,
    seed: int = 0,
    extraction_method: str = "strict",
) -> ComparisonReport:
    """Compares runs with each other and against a baseline.

    Every run is scored again from its responses, with `extraction_method`
    and its own task's answer format, so runs evaluated under different
    `--extraction_method`s, or by older code, compare alike.

    Args:
      runs: the runs, e.g. from `load_runs`; they are numbered in this order.
      baseline: the index or tag of the run the others are compared against;
        None: the base model's run that finished the most problems (else the
        run that did), the first of equals.
      num_resamples: resamples of the paired bootstrap.
      seed: seed of the paired bootstrap.
      extraction_method: one of `extraction.EXTRACTION_METHODS`.

    Returns:
      The report: accuracy per run, and whether it finished; per other run,
      the paired comparison against the baseline on the problems both
      finished (sample 0 of each question when k > 1), with McNemar's
      verdict; for runs differing only in batch size, how often their
      responses and their correctness agree; for runs with k > 1, pass@k,
      maj@k, mean accuracy and reranked accuracies.
    """
    if not runs:
        raise ValueError("No runs to compare.")
    if extraction_method not in EXTRACTION_METHODS:
        raise ValueError(
            f"extraction_method must be one of {EXTRACTION_METHODS}, got"
            f" {extraction_method!r}."
        )
    runs = [_rescored(run, extraction_method) for run in runs]
    base = _baseline_index(runs, baseline)
    groups: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(_settings_key(run), []).append(i)
    return ComparisonReport(
        runs=[_run_row(i, run) for i, run in enumerate(runs)],
        baseline=base,
        paired=_with_holm(
            [
                _paired(runs, base, i, num_resamples, seed)
                for i in range(len(runs))
                if i != base
            ]
        ),
        consistency=[
            _consistency(runs, i, j)
            for members in groups.values()
            for i, j in itertools.combinations(members, 2)
        ],
        multi_sample=[
            multi_sample_metrics(i, run, CONFIDENCE)
            for i, run in enumerate(runs)
            if run.num_samples > 1
        ],
        extraction_method=extraction_method,
        num_resamples=num_resamples,
        seed=seed,
        significance_level=SIGNIFICANCE_LEVEL,
    )
