"""Which checkpoint is better? Comparing finished GSM8K runs honestly.

A run is the files `evaluate` writes for one tag (`rollouts_<tag>.jsonl`,
`summary_<tag>.json`, `run_<tag>.json`). This module

* loads runs (`load_run`, `load_runs`);
* compares them (`compare_runs`): accuracy with a 95% interval per run; for
  each run against a baseline, on the problems both answered (paired by
  example id), the difference with a paired bootstrap interval, the exact
  McNemar test and the problems they disagree on; whether runs that differ
  only in batch size gave the same responses; and, with several samples per
  question, pass@k, maj@k, clustered mean accuracy and reranking;
* renders the comparison (`ComparisonReport.to_markdown`, `.to_json`,
  `plot_accuracies`);
* evaluates a base model and a list of LoRA checkpoints in one process
  (`evaluate_checkpoints`), loading the base weights once.

All statistics come from `gsm8k_jax.eval.stats`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from gsm8k_jax.checkpoints.sources import resolve_model_dir
from gsm8k_jax.eval import stats
from gsm8k_jax.eval.data import BUNDLED_TEST_SET, load_gsm8k
from gsm8k_jax.eval.extraction import answers_match
from gsm8k_jax.eval.results import RunFiles, model_config, run_info, run_tag
from gsm8k_jax.eval.runner import EvalConfig, evaluate
from gsm8k_jax.models.gemma3.model import Gemma3
from gsm8k_jax.models.registry import load_pretrained, model_spec
from gsm8k_jax.sampling.sampler import Sampler

if TYPE_CHECKING:
    from gsm8k_jax.checkpoints.lora import LoraConfig

__all__ = [
    "Answer",
    "BatchConsistency",
    "ComparisonReport",
    "Disagreement",
    "MultiSampleMetrics",
    "PairedComparison",
    "RunResult",
    "RunRow",
    "compare_runs",
    "evaluate_checkpoints",
    "load_run",
    "load_runs",
    "majority_vote_scorer",
    "mean_logprob_scorer",
    "plot_accuracies",
    "rerank",
]

CONFIDENCE = 0.95
_FILE_NAME = re.compile(
    r"(?:rollouts_(?P<rollouts>.+)\.jsonl|(?:summary|run)_(?P<json>.+)\.json)"
)
# Responses longer than this are cut in the Markdown report (never in JSON).
_MARKDOWN_RESPONSE_CHARS = 600

# A reranker: given one question's candidates (rollout dicts, in sample
# order), the index of the one to submit.
Scorer = Callable[[list[dict[str, Any]]], int]


# --------------------------------------------------------------------------- #
# Loading runs
# --------------------------------------------------------------------------- #


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

    def by_question(self) -> list[list[dict[str, Any]]]:
        """The rollouts grouped per example id (in id order), each group in
        sample order."""
        ordered = sorted(self.rollouts, key=lambda r: (r["id"], r["sample_index"]))
        return [
            list(group)
            for _, group in itertools.groupby(ordered, key=lambda r: r["id"])
        ]


def _tags_in(folder: Path) -> list[str]:
    return sorted(
        p.name.removeprefix("rollouts_").removesuffix(".jsonl")
        for p in folder.glob("rollouts_*.jsonl")
    )


def _read_rollouts(path: Path) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}, line {number}: not valid JSON ({e.msg}). An interrupted"
                    " run leaves a torn last line: resume the run to repair it."
                ) from e
    return records


def _finished(records: list[dict[str, Any]], num_samples: int) -> list[dict[str, Any]]:
    """The rollouts of examples with all `num_samples` samples, sorted."""
    samples: dict[int, set[int]] = {}
    for r in records:
        samples.setdefault(r["id"], set()).add(r["sample_index"])
    complete = {i for i, s in samples.items() if s == set(range(num_samples))}
    kept = {(r["id"], r["sample_index"]): r for r in records if r["id"] in complete}
    return [kept[key] for key in sorted(kept)]


def _load(folder: Path, tag: str) -> RunResult:
    files = RunFiles(folder, tag)
    if not files.rollouts_path.exists():
        raise FileNotFoundError(
            f"{files.rollouts_path} not found: run '{tag}' has no rollouts."
        )
    summary = (
        json.loads(files.summary_path.read_text(encoding="utf-8"))
        if files.summary_path.exists()
        else None
    )
    if summary is not None:
        run_info = summary["run"]
    elif files.run_path.exists():
        run_info = json.loads(files.run_path.read_text(encoding="utf-8"))
    else:
        raise FileNotFoundError(
            f"{folder} has rollouts of run '{tag}' but neither {files.summary_path.name}"
            f" nor {files.run_path.name}, which say what produced them."
        )
    num_samples = run_info["eval"]["sampling"]["num_samples"]
    rollouts = _finished(_read_rollouts(files.rollouts_path), num_samples)
    if not rollouts:
        raise ValueError(
            f"{files.rollouts_path} holds no finished example yet (each needs"
            f" {num_samples} sample(s))."
        )
    return RunResult(
        tag=tag,
        model_name=run_info["model"]["model_name"],
        checkpoint=run_info["lora_checkpoint"],
        batch_size=run_info["eval"]["batch_size"],
        num_samples=num_samples,
        rollouts=rollouts,
        summary=summary,
        run_info=run_info,
        source=str(folder),
    )


def load_runs(path: str | os.PathLike) -> list[RunResult]:
    """Every run in a results folder (one per tag), sorted by tag.

    Args:
      path: a results folder, or one of a run's files (then that run only).

    Raises:
      FileNotFoundError: the path does not exist, or the folder holds no
        `rollouts_<tag>.jsonl` file.
      ValueError: a rollouts file is damaged or holds no finished example.
    """
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"Results path not found: {folder}.")
    if folder.is_file():
        return [load_run(folder)]
    tags = _tags_in(folder)
    if not tags:
        found = sorted(p.name for p in folder.iterdir())[:10]
        raise FileNotFoundError(
            f"No results in {folder}: expected rollouts_<tag>.jsonl files as the"
            " eval_gsm8k scripts write them, but "
            + (f"it holds {found}." if found else "it is empty.")
        )
    return [_load(folder, tag) for tag in tags]


def load_run(path: str | os.PathLike) -> RunResult:
    """One run, from its results folder or from one of its files.

    Args:
      path: `rollouts_<tag>.jsonl`, `summary_<tag>.json` or `run_<tag>.json`,
        or a folder holding a single run.

    Raises:
      FileNotFoundError: the path or the run's rollouts do not exist.
      ValueError: the file name is not a run file, the folder holds several
        runs (use `load_runs`), or the rollouts are damaged or empty.
    """
    path = Path(path)
    if path.is_file():
        match = _FILE_NAME.fullmatch(path.name)
        if match is None:
            raise ValueError(
                f"{path} is not a results file: expected rollouts_<tag>.jsonl,"
                " summary_<tag>.json or run_<tag>.json."
            )
        return _load(path.parent, match["rollouts"] or match["json"])
    if not path.exists():
        raise FileNotFoundError(f"Results path not found: {path}.")
    tags = _tags_in(path)
    if len(tags) > 1:
        raise ValueError(
            f"{path} holds {len(tags)} runs ({', '.join(tags)}): pass one of their"
            " files, or use load_runs."
        )
    return load_runs(path)[0]


# --------------------------------------------------------------------------- #
# Rerankers
# --------------------------------------------------------------------------- #


def majority_vote_scorer(candidates: list[dict[str, Any]]) -> int:
    """The first candidate giving the most common answer (numeric equality).

    Submitting it scores exactly maj@k. Candidates without an answer do not
    vote; if none has one, the first candidate is chosen.
    """
    answers = [c["extracted_answer"] for c in candidates]
    winner = stats.majority_vote(answers, equal=answers_match)
    return 0 if winner is None else answers.index(winner)


def mean_logprob_scorer(candidates: list[dict[str, Any]]) -> int:
    """The candidate the model is most confident in: highest mean log-prob
    per generated token (`logprob / num_tokens`); ties go to the first."""
    scores = [c["logprob"] / max(c["num_tokens"], 1) for c in candidates]
    return int(np.argmax(scores))


def _first_sample_scorer(candidates: list[dict[str, Any]]) -> int:
    del candidates
    return 0


def rerank(run: RunResult, scorer: Scorer) -> float:
    """Accuracy when `scorer` picks one of the k samples of every question.

    Args:
      run: a run with one or more samples per question.
      scorer: given one question's candidate rollouts (in sample order),
        returns the index of the candidate to submit.

    Raises:
      ValueError: the scorer returned an index out of range.
    """
    groups = run.by_question()
    num_correct = 0
    for group in groups:
        choice = scorer(group)
        if not 0 <= choice < len(group):
            raise ValueError(
                f"The scorer chose candidate {choice} of {len(group)} for example"
                f" {group[0]['id']}."
            )
        num_correct += bool(group[choice]["correct"])
    return num_correct / len(groups)


# --------------------------------------------------------------------------- #
# The report
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class RunRow:
    """One run in the accuracy table.

    `accuracy` is over all (question, sample) rows. Its interval is Wilson's
    with one sample per question, and with k > 1 the normal interval of the
    question-clustered standard error (samples of a question are correlated).
    """

    index: int
    tag: str
    model_name: str
    checkpoint: str
    batch_size: int
    num_samples: int
    correct: int
    total: int
    accuracy: float
    accuracy_ci95: tuple[float, float]
    interval: str  # "wilson" or "clustered"
    source: str


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
    """A run against the baseline on the problems both answered.

    Attributes:
      baseline: index of the baseline run.
      candidate: index of the compared run.
      num_common: problems paired by id (and identical question text).
      question_mismatches: ids both runs have but with different questions
        (runs on other data files); left out of the pairing.
      baseline_accuracy: baseline accuracy on the paired problems.
      candidate_accuracy: candidate accuracy on the paired problems.
      difference: candidate - baseline, with a paired bootstrap interval;
        None when no problem is paired.
      mcnemar: exact McNemar test; `b` counts problems only the baseline
        got right, `c` those only the candidate got right.
      baseline_only_correct: ids of the `b` problems.
      candidate_only_correct: ids of the `c` problems.
      disagreements: the `b` and `c` problems in id order, to read.
      first_sample_only: True when either run drew several samples per
        question; the pairing then uses sample 0 of each.
    """

    baseline: int
    candidate: int
    num_common: int
    question_mismatches: list[int]
    baseline_accuracy: float | None
    candidate_accuracy: float | None
    difference: stats.BootstrapResult | None
    mcnemar: stats.McNemarResult | None
    baseline_only_correct: list[int]
    candidate_only_correct: list[int]
    disagreements: list[Disagreement]
    first_sample_only: bool


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
class MultiSampleMetrics:
    """Summaries of a run with k > 1 samples per question.

    Attributes:
      run: index of the run.
      num_samples: k.
      num_questions: questions with all k samples.
      pass_at: unbiased pass@j for j = 1, 2, 4, ... and k.
      maj_at_k: accuracy of the majority-vote answer.
      mean_accuracy: accuracy over all samples.
      mean_accuracy_ci95: its interval from the question-clustered standard
        error; None with a single question.
      selection: accuracy when one sample per question is submitted, chosen
        by: the first sample (baseline), each built-in reranker, and an
        oracle that picks a correct one when there is one (= pass@k).
    """

    run: int
    num_samples: int
    num_questions: int
    pass_at: dict[str, float]
    maj_at_k: float
    mean_accuracy: float
    mean_accuracy_ci95: tuple[float, float] | None
    selection: dict[str, float]


@dataclasses.dataclass(frozen=True)
class ComparisonReport:
    """The comparison of several runs; see `compare_runs`."""

    runs: list[RunRow]
    baseline: int
    paired: list[PairedComparison]
    consistency: list[BatchConsistency]
    multi_sample: list[MultiSampleMetrics]
    num_resamples: int
    seed: int

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-serialisable dict (disagreements in full)."""
        return dataclasses.asdict(self)

    def to_markdown(self, max_disagreements: int = 5) -> str:
        """The report as Markdown.

        Args:
          max_disagreements: per compared run, how many disagreeing problems
            to print with their responses (all their ids are listed).
        """
        return "\n".join(_markdown(self, max_disagreements)) + "\n"


def _label(row: RunRow) -> str:
    return f"#{row.index} `{row.tag}`"


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2%}"


def _interval(low: float, high: float) -> str:
    return f"{low:.2%}–{high:.2%}"


def _points(x: float) -> str:
    return f"{100 * x:+.2f}"


def _ids(ids: Sequence[int]) -> str:
    return ", ".join(map(str, ids)) if ids else "none"


def _quote(text: str) -> list[str]:
    if len(text) > _MARKDOWN_RESPONSE_CHARS:
        text = text[:_MARKDOWN_RESPONSE_CHARS] + " […]"
    return ["    " + line for line in (text or "(empty)").splitlines()]


def _markdown(report: ComparisonReport, max_disagreements: int) -> list[str]:
    rows = report.runs
    multi = any(r.num_samples > 1 for r in rows)
    lines = ["# GSM8K comparison", ""]
    header = ["Run", "Model", "Checkpoint", "batch_size"]
    header += ["Samples"] if multi else []
    header += ["Correct", "Total", "Accuracy (95% interval)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        name = f"#{r.index} `{r.tag}`" + (
            " (baseline)" if r.index == report.baseline else ""
        )
        interval = _interval(*r.accuracy_ci95) + (
            "*" if r.interval == "clustered" else ""
        )
        cells = [name, r.model_name, r.checkpoint or "base", str(r.batch_size)]
        cells += [str(r.num_samples)] if multi else []
        cells += [str(r.correct), str(r.total), f"{r.accuracy:.2%} ({interval})"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if multi:
        lines += [
            (
                "Accuracy is over all samples. \\* Interval from the question-clustered"
                " standard error (samples of a question are correlated); otherwise Wilson."
            ),
            "",
        ]

    if report.paired:
        base = rows[report.baseline]
        lines += [f"## Paired comparison against {_label(base)}", ""]
        if any(p.first_sample_only for p in report.paired):
            lines += [
                (
                    "Runs with several samples per question are paired on sample 0 of"
                    " each question."
                ),
                "",
            ]
        for p in report.paired:
            lines += _paired_markdown(p, rows, report.num_resamples, max_disagreements)

    if report.consistency:
        lines += [
            "## Batch-size consistency",
            "",
            (
                "Runs with the same model, checkpoint, data and settings but for the"
                " batch size, matched by (example id, sample). Both shares should be"
                " 100%."
            ),
            "",
            "| Runs | batch_size | Rows | Identical responses | Identical correctness |",
            "|---|---|---|---|---|",
        ]
        for c in report.consistency:
            i, j = c.runs
            lines.append(
                f"| #{i} vs #{j} | {c.batch_sizes[0]} vs {c.batch_sizes[1]} |"
                f" {c.num_rows} | {_percent(c.identical_responses_share)}"
                f" ({c.identical_responses}/{c.num_rows}) |"
                f" {_percent(c.identical_correctness_share)}"
                f" ({c.identical_correctness}/{c.num_rows}) |"
            )
        lines.append("")

    if report.multi_sample:
        lines += ["## Several samples per question", ""]
        for m in report.multi_sample:
            lines += _multi_sample_markdown(m, rows[m.run])
    return lines


def _paired_markdown(
    p: PairedComparison,
    rows: list[RunRow],
    num_resamples: int,
    max_disagreements: int,
) -> list[str]:
    lines = [f"### {_label(rows[p.candidate])} vs baseline", ""]
    if p.question_mismatches:
        lines += [
            (
                f"**Warning:** {len(p.question_mismatches)} ids have different questions"
                " in the two runs (other data files?) and are left out: ids"
                f" {_ids(p.question_mismatches)}."
            ),
            "",
        ]
    if p.difference is None or p.mcnemar is None:
        return lines + ["No problem in common: nothing to pair.", ""]
    d, m = p.difference, p.mcnemar
    lines += [
        f"- Problems in common: {p.num_common}",
        (
            f"- Accuracy on them: baseline {_percent(p.baseline_accuracy)}, this run"
            f" {_percent(p.candidate_accuracy)}"
        ),
        (
            f"- Difference (this run − baseline): {_points(d.diff)} points, 95% paired"
            f" bootstrap interval [{_points(d.low)}, {_points(d.high)}]"
            f" ({num_resamples:,} resamples)"
        ),
        (
            f"- McNemar exact test: b = {m.b} (only the baseline right), c = {m.c}"
            f" (only this run right), p = {m.p_value:.4g}"
        ),
        f"- Only the baseline right: ids {_ids(p.baseline_only_correct)}",
        f"- Only this run right: ids {_ids(p.candidate_only_correct)}",
        "",
    ]
    shown = p.disagreements[:max_disagreements]
    if shown:
        more = len(p.disagreements) - len(shown)
        lines += [
            f"Disagreements to read ({len(shown)} of {len(p.disagreements)}"
            + (f"; all {more + len(shown)} in comparison.json" if more else "")
            + "):",
            "",
        ]
    for dis in shown:
        lines += [f"#### Example {dis.id} (gold {dis.gold})", ""]
        lines += [f"> {line}" for line in dis.question.splitlines()] + [""]
        for who, answer in (("Baseline", dis.baseline), ("This run", dis.candidate)):
            verdict = "right" if answer.correct else "wrong"
            extracted = (
                "no answer extracted"
                if answer.extracted_answer is None
                else f"answer `{answer.extracted_answer}`"
            )
            lines += [
                f"{who} ({verdict}, {extracted}):",
                "",
                *_quote(answer.response),
                "",
            ]
    return lines


def _multi_sample_markdown(m: MultiSampleMetrics, row: RunRow) -> list[str]:
    mean = _percent(m.mean_accuracy)
    if m.mean_accuracy_ci95 is not None:
        mean += f" ({_interval(*m.mean_accuracy_ci95)})"
    lines = [
        f"### {_label(row)}: k = {m.num_samples}, {m.num_questions} questions",
        "",
        "| Metric | Value |",
        "|---|---|",
        *(f"| {name} (unbiased) | {_percent(v)} |" for name, v in m.pass_at.items()),
        f"| maj@{m.num_samples} | {_percent(m.maj_at_k)} |",
        f"| mean accuracy (95% clustered interval) | {mean} |",
        "",
        f"Submitting one of the {m.num_samples} samples per question:",
        "",
        "| Selection | Accuracy |",
        "|---|---|",
        *(f"| {name} | {_percent(v)} |" for name, v in m.selection.items()),
        "",
    ]
    return lines


# --------------------------------------------------------------------------- #
# Comparing
# --------------------------------------------------------------------------- #


def _clustered_interval(
    grid: np.ndarray,
) -> tuple[float, tuple[float, float] | None]:
    """Mean of a [questions, samples] grid and its clustered normal interval."""
    if grid.shape[0] < 2:
        return float(grid.mean()), None
    mean, se = stats.clustered_mean_accuracy(grid)
    z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)
    return mean, (max(0.0, mean - z * se), min(1.0, mean + z * se))


def _correct_grid(run: RunResult) -> np.ndarray:
    return np.array([[r["correct"] for r in g] for g in run.by_question()], dtype=bool)


def _run_row(index: int, run: RunResult) -> RunRow:
    correct = sum(bool(r["correct"]) for r in run.rollouts)
    total = len(run.rollouts)
    interval, method = None, "wilson"
    if run.num_samples > 1:
        _, interval = _clustered_interval(_correct_grid(run))
        method = "clustered"
    if interval is None:
        interval, method = stats.accuracy_interval(correct, total, CONFIDENCE), "wilson"
    return RunRow(
        index=index,
        tag=run.tag,
        model_name=run.model_name,
        checkpoint=run.checkpoint,
        batch_size=run.batch_size,
        num_samples=run.num_samples,
        correct=correct,
        total=total,
        accuracy=correct / total,
        accuracy_ci95=tuple(interval),
        interval=method,
        source=run.source,
    )


def _first_samples(run: RunResult) -> dict[int, dict[str, Any]]:
    return {r["id"]: r for r in run.rollouts if r["sample_index"] == 0}


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
    return PairedComparison(
        baseline=baseline,
        candidate=candidate,
        num_common=len(ids),
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
        mcnemar=stats.mcnemar_exact(a_correct, b_correct) if ids else None,
        baseline_only_correct=[d.id for d in disagreements if d.baseline.correct],
        candidate_only_correct=[d.id for d in disagreements if d.candidate.correct],
        disagreements=disagreements,
        first_sample_only=max(runs[baseline].num_samples, runs[candidate].num_samples)
        > 1,
    )


def _settings_key(run: RunResult) -> str:
    """What determines a run's responses, except its batch size and where its
    files were (model folder, data file when its digest is known)."""
    info = copy.deepcopy(run.run_info)
    del info["eval"]["batch_size"]
    info.pop("model_dir", None)
    info.pop("num_examples", None)
    if info.get("data_sha256") != "gcs":
        info.pop("data_path", None)
    return json.dumps(info, sort_keys=True)


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


def _budgets(k: int) -> list[int]:
    """1, 2, 4, ... below k, then k."""
    return sorted({2**e for e in range(k.bit_length()) if 2**e < k} | {k})


def _multi_sample(index: int, run: RunResult) -> MultiSampleMetrics:
    k = run.num_samples
    groups = run.by_question()
    grid = _correct_grid(run)
    pass_at = {
        f"pass@{j}": float(
            np.mean([stats.pass_at_k(k, int(row.sum()), j) for row in grid])
        )
        for j in _budgets(k)
    }
    mean, interval = _clustered_interval(grid)
    return MultiSampleMetrics(
        run=index,
        num_samples=k,
        num_questions=len(groups),
        pass_at=pass_at,
        maj_at_k=stats.maj_at_k(
            [[r["extracted_answer"] for r in g] for g in groups],
            [g[0]["gold"] for g in groups],
            equal=answers_match,
        ),
        mean_accuracy=mean,
        mean_accuracy_ci95=interval,
        selection={
            "sample 0 (baseline)": rerank(run, _first_sample_scorer),
            "majority vote": rerank(run, majority_vote_scorer),
            "mean log-prob per token": rerank(run, mean_logprob_scorer),
            f"oracle (any correct = pass@{k})": pass_at[f"pass@{k}"],
        },
    )


def _baseline_index(runs: Sequence[RunResult], baseline: int | str) -> int:
    if isinstance(baseline, str):
        matches = [i for i, r in enumerate(runs) if r.tag == baseline]
        if len(matches) != 1:
            found = "no run has" if not matches else f"runs {matches} have"
            raise ValueError(
                f"Baseline {baseline!r}: {found} that tag; tags:"
                f" {[r.tag for r in runs]}. Give the baseline's index instead."
            )
        return matches[0]
    if not 0 <= baseline < len(runs):
        raise ValueError(
            f"Baseline index {baseline} out of range for {len(runs)} runs."
        )
    return baseline


def compare_runs(
    runs: Sequence[RunResult],
    baseline: int | str = 0,
    num_resamples: int = 10_000,
    seed: int = 0,
) -> ComparisonReport:
    """Compares runs with each other and against a baseline.

    Args:
      runs: the runs, e.g. from `load_runs`; they are numbered in this order.
      baseline: the index or tag of the run the others are compared against.
      num_resamples: resamples of the paired bootstrap.
      seed: seed of the paired bootstrap.

    Returns:
      The report: accuracy per run; per other run, the paired comparison
      against the baseline (sample 0 of each question when k > 1); for runs
      differing only in batch size, how often their responses and their
      correctness agree; for runs with k > 1, pass@k, maj@k, mean accuracy
      and reranked accuracies.
    """
    if not runs:
        raise ValueError("No runs to compare.")
    base = _baseline_index(runs, baseline)
    groups: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(_settings_key(run), []).append(i)
    return ComparisonReport(
        runs=[_run_row(i, run) for i, run in enumerate(runs)],
        baseline=base,
        paired=[
            _paired(runs, base, i, num_resamples, seed)
            for i in range(len(runs))
            if i != base
        ],
        consistency=[
            _consistency(runs, i, j)
            for members in groups.values()
            for i, j in itertools.combinations(members, 2)
        ],
        multi_sample=[
            _multi_sample(i, run) for i, run in enumerate(runs) if run.num_samples > 1
        ],
        num_resamples=num_resamples,
        seed=seed,
    )


def plot_accuracies(report: ComparisonReport, path: str | os.PathLike) -> Figure:
    """Saves a PNG of each run's accuracy (a point) with its 95% interval.

    One row per run, top to bottom in report order; the baseline is orange,
    with its accuracy as a dashed line. Drawn without pyplot, so it works
    with any matplotlib backend and leaves pyplot's state alone.

    Returns:
      The figure, for further use.
    """
    rows = report.runs
    fig = Figure(figsize=(7.0, 1.2 + 0.45 * len(rows)))
    ax = fig.add_subplot()
    for y, r in enumerate(rows):
        low, high = r.accuracy_ci95
        ax.errorbar(
            r.accuracy,
            y,
            xerr=[[r.accuracy - low], [high - r.accuracy]],
            fmt="o",
            capsize=4,
            color="tab:orange" if r.index == report.baseline else "tab:blue",
        )
    ax.axvline(rows[report.baseline].accuracy, color="tab:orange", linestyle="--", lw=1)
    ax.set_yticks(
        range(len(rows)),
        [
            f"#{r.index} {r.tag}"
            + (" (baseline)" if r.index == report.baseline else "")
            for r in rows
        ],
    )
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(-0.02, 1.02)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("GSM8K accuracy, 95% interval")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


# --------------------------------------------------------------------------- #
# Evaluating a base model and its LoRA checkpoints
# --------------------------------------------------------------------------- #

# `load_lora(model, path, config, merge=True)`: merges a checkpoint into
# `model` in place (see `gsm8k_jax.checkpoints.lora.load_lora`).
LoadLoraFn = Callable[..., Gemma3]


def evaluate_checkpoints(
    model_name: str,
    model_path: str | None,
    lora_paths: Sequence[str],
    lora_config: LoraConfig,
    eval_config: EvalConfig,
    output_dir: str | os.PathLike,
    *,
    include_base: bool = True,
    data_path: str | None = None,
    num_examples: int | None = None,
    dtype: str = "bfloat16",
    resume: bool = True,
    overwrite: bool = False,
    show_progress: bool = True,
    load_lora_fn: LoadLoraFn | None = None,
) -> list[RunResult]:
    """Evaluates a base model and each of its LoRA checkpoints, in one process.

    The base weights are loaded once. Before each checkpoint is merged, the
    base weights are put back (the model keeps references to the base
    arrays, which merging replaces rather than modifies, so this costs no
    memory), and one `Sampler` serves every run, compiled once. Each run's
    files and tag are those `eval_gsm8k.py` / `eval_gsm8k_base.py` would
    write with the same settings, so runs resume and compare alike.

    Args:
      model_name: a name from `registry.MODELS`.
      model_path: hub id, local folder or gs:// folder; None or "" for the
        model's default source.
      lora_paths: LoRA checkpoints, anything `resolve_lora_checkpoint`
        accepts (local or gs://).
      lora_config: rank, alpha and module_path the adapters were trained with.
      eval_config: the evaluation settings (stop ids included).
      output_dir: the folder for every run's files.
      include_base: also evaluate the base model, first.
      data_path: GSM8K JSONL file; default the bundled test set.
      num_examples: evaluate the first N problems only.
      dtype: weights dtype, as `--model.dtype`.
      resume: continue runs found in `output_dir`.
      overwrite: replace runs found in `output_dir`.
      show_progress: show a progress bar per run.
      load_lora_fn: merges a checkpoint into the model in place;
        `gsm8k_jax.checkpoints.lora.load_lora` by default.

    Returns:
      The runs, base first, then the checkpoints in order.

    Raises:
      ValueError: nothing to evaluate, or two checkpoints would share a tag.
      ResultsError: `output_dir` holds other runs under the same tags.
      CheckpointError, SourceError: a checkpoint or the model cannot be read.
    """
    from gsm8k_jax.checkpoints import lora as lora_lib  # qwix, orbax: heavy.

    load_lora_fn = load_lora_fn or lora_lib.load_lora
    if not lora_paths and not include_base:
        raise ValueError("Nothing to evaluate: no LoRA checkpoint and no base model.")
    # Every input is checked before the model is loaded.
    # (path as given, resolved path); ("", "") is the base model.
    checkpoints = [("", "")] if include_base else []
    checkpoints += [(str(p), lora_lib.resolve_lora_checkpoint(p)) for p in lora_paths]
    data_path = str(data_path or BUNDLED_TEST_SET)
    examples = load_gsm8k(data_path, num_examples)
    model_dir = resolve_model_dir(model_path or model_spec(model_name).default_path)

    runs: list[tuple[str, RunFiles, dict[str, Any]]] = []
    for raw_path, lora_path in checkpoints:
        model = model_config(model_name)
        model.model_path = model_path or ""
        model.dtype = dtype
        model.lora_config = dataclasses.asdict(lora_config)
        model.lora_checkpoint_path = raw_path
        info = run_info(
            model.to_dict(),
            model_dir=model_dir,
            lora_path=lora_path,
            data_path=data_path,
            num_examples=len(examples),
            eval_config=eval_config,
        )
        tag = run_tag(
            model_name, lora_path, eval_config.batch_size, lora_config if lora_path else None
        )
        files = RunFiles(output_dir, tag)
        runs.append((lora_path, files, info))
    tags = [files.tag for _, files, _ in runs]
    if len(set(tags)) < len(tags):
        raise ValueError(
            f"Checkpoints {[p for p, _ in checkpoints]} would share run tags {tags}"
            " (a tag names a checkpoint by the last components of its path):"
            " evaluate them into separate output folders."
        )
    for _, files, info in runs:
        files.prepare(info, resume=resume, overwrite=overwrite)

    model, tokenizer, _ = load_pretrained(model_name, model_dir, dtype=dtype)
    sampler = Sampler(model, tokenizer)
    # New Variables holding the base arrays: merging replaces a Variable's
    # array, so these stay the base weights.
    base_params = jax.tree.map(lambda x: x, nnx.state(model, nnx.Param))
    results = []
    for lora_path, files, info in runs:
        nnx.update(model, base_params)
        if lora_path:
            logging.info("Merging %s into the base weights.", lora_path)
            load_lora_fn(model, lora_path, lora_config, merge=True)
        evaluate(
            sampler,
            examples,
            eval_config,
            files,
            run_info=info,
            show_progress=show_progress,
        )
        results.append(_load(files.output_dir, files.tag))
    return results
