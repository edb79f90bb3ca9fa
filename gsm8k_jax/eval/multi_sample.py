"""Runs with several samples per question: pass@k, maj@k, clustered accuracy
and reranking (which of the k samples to submit).

Needs neither jax nor a model; the intervals come from `gsm8k_jax.eval.stats`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from gsm8k_jax.eval import stats
from gsm8k_jax.eval.extraction import answers_match
from gsm8k_jax.eval.runs import RunResult
from gsm8k_jax.eval.sample_stats import maj_at_k, majority_vote, pass_at_k

__all__ = [
    "MultiSampleMetrics",
    "Scorer",
    "clustered_interval",
    "correct_grid",
    "majority_vote_scorer",
    "mean_logprob_scorer",
    "multi_sample_metrics",
    "rerank",
]


# A reranker: given one question's candidates (rollout dicts, in sample
# order), the index of the one to submit.
Scorer = Callable[[list[dict[str, Any]]], int]


def majority_vote_scorer(candidates: list[dict[str, Any]]) -> int:
    """The first candidate giving the most common answer (numeric equality).

    Submitting it scores exactly maj@k. Candidates without an answer do not
    vote; if none has one, the first candidate is chosen.
    """
    answers = [c["extracted_answer"] for c in candidates]
    winner = majority_vote(answers, equal=answers_match)
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
      mean_accuracy_ci95: its question-clustered interval
        (`stats.clustered_accuracy_interval`); None with a single question.
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


def correct_grid(run: RunResult) -> np.ndarray:
    """The run's correctness as a [questions, samples] bool array."""
    return np.array([[r["correct"] for r in g] for g in run.by_question()], dtype=bool)


def clustered_interval(
    grid: np.ndarray, confidence: float
) -> tuple[float, tuple[float, float] | None]:
    """Mean of a [questions, samples] grid and its question-clustered
    interval (`stats.clustered_accuracy_interval`); no interval with a
    single question."""
    if grid.shape[0] < 2:
        return float(grid.mean()), None
    return float(grid.mean()), stats.clustered_accuracy_interval(grid, confidence)


def _budgets(k: int) -> list[int]:
    """1, 2, 4, ... below k, then k."""
    return sorted({2**e for e in range(k.bit_length()) if 2**e < k} | {k})


def multi_sample_metrics(
    index: int, run: RunResult, confidence: float
) -> MultiSampleMetrics:
    """pass@j, maj@k, the clustered mean accuracy (with its `confidence`
    interval) and the reranked accuracies of run number `index`."""
    k = run.num_samples
    groups = run.by_question()
    grid = correct_grid(run)
    pass_at = {
        f"pass@{j}": float(np.mean([pass_at_k(k, int(row.sum()), j) for row in grid]))
        for j in _budgets(k)
    }
    mean, interval = clustered_interval(grid, confidence)
    return MultiSampleMetrics(
        run=index,
        num_samples=k,
        num_questions=len(groups),
        pass_at=pass_at,
        maj_at_k=maj_at_k(
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
