"""Scoring: responses -> correct or not under every extraction method ->
a run's accuracy, with lm-eval's figures for its tasks.

Scores are always computed again from the responses (`rescore`), so a
summary, a resumed run and a comparison all score with the extraction of
the code that reads them. Needs neither jax nor a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gsm8k_jax.eval import tasks
from gsm8k_jax.eval.extraction import EXTRACTION_METHODS, answers_match, extract_answer
from gsm8k_jax.eval.lm_eval_filters import mean_and_stderr
from gsm8k_jax.eval.sample_stats import maj_at_k, pass_at_k
from gsm8k_jax.eval.stats import clustered_mean_accuracy, grid_accuracy_interval

__all__ = ["rescore", "score", "summarize"]


def score(
    response: str, gold: str, solution: str | None, method: str, task: tasks.Task
) -> dict[str, Any]:
    """A response's rollout fields under every extraction method, headed by
    `method`'s (`extracted_answer`, `correct`); an lm-eval task's filters
    (`strict-match`, `flexible-extract`) join them, judged by lm-eval's
    exact_match against the reference `solution`."""
    answers = {
        m: extract_answer(response, m, task.final_answer) for m in EXTRACTION_METHODS
    }
    correct = {m: a is not None and answers_match(a, gold) for m, a in answers.items()}
    for name, (answer, match) in tasks.lm_eval_scores(task, response, solution).items():
        answers[name], correct[name] = answer, match
    return {
        "extracted_answer": answers[method],
        "correct": correct[method],
        "extracted_answers": answers,
        "correct_by_method": correct,
    }


def rescore(
    rollouts: Sequence[dict[str, Any]], method: str, task: tasks.Task
) -> list[dict[str, Any]]:
    """The rollouts scored again from their responses, headed by `method`:
    changing the extraction needs no generation."""
    return [
        # Runs from before 2026-12-01 have no reference solution; only the
        # lm-eval tasks (added later) need it.
        r | score(r["response"], r["gold"], r.get("reference_solution"), method, task)
        for r in rollouts
    ]


def _accuracy(
    groups: Sequence[Sequence[dict[str, Any]]], method: str
) -> dict[str, Any]:
    """Accuracy under `method` over every sample of the question `groups`
    (rescored rollouts), with its 95% interval (`grid_accuracy_interval`:
    clustered by question when a question has several samples), and the
    answers not found."""
    grid = np.array([[r["correct_by_method"][method] for r in g] for g in groups])
    interval, kind = (
        grid_accuracy_interval(grid, 0.95) if grid.size else ((0.0, 0.0), "wilson")
    )
    return {
        "correct": int(grid.sum()),
        "accuracy": float(grid.mean()) if grid.size else 0.0,
        "accuracy_ci95": list(interval),
        "accuracy_ci95_method": kind,
        "extraction_failures": sum(
            r["extracted_answers"][method] is None for g in groups for r in g
        ),
    }


def _lm_eval_metrics(
    rollouts: Sequence[dict[str, Any]], task: tasks.Task
) -> dict[str, Any]:
    """lm-eval's results entry of `task`: each filter's exact_match and its
    standard error, under lm-eval's names, over each question's first sample
    (lm-eval's `take_first`)."""
    first = [r for r in rollouts if r["sample_index"] == 0]
    metrics: dict[str, Any] = {"task": task.lm_eval_task, "chat": task.chat}
    for name, _ in task.filters:
        mean, stderr = mean_and_stderr([r["correct_by_method"][name] for r in first])
        metrics[f"exact_match,{name}"] = mean
        metrics[f"exact_match_stderr,{name}"] = stderr
    return metrics


def summarize(
    rollouts: Sequence[dict[str, Any]],
    num_samples: int,
    method: str,
    task: tasks.Task,
) -> dict[str, Any]:
    """Accuracy (over all samples) with a 95% interval (Wilson's; with
    several samples per question, clustered by question) and failure counts,
    under `method` and under every method (`by_method`, as
    lm-evaluation-harness reports strict and flexible together), and
    pass@k / maj@k when several samples were drawn per question. An lm-eval
    task adds its filters to `by_method` and lm-eval's own figures
    (`lm_eval`). The rollouts are scored again from their responses
    (`rescore`)."""
    rollouts = rescore(rollouts, method, task)
    by_id: dict[int, list[dict[str, Any]]] = {}
    for r in sorted(rollouts, key=lambda r: (r["id"], r["sample_index"])):
        by_id.setdefault(r["id"], []).append(r)
    groups = list(by_id.values())
    summary: dict[str, Any] = {
        "extraction_method": method,
        **_accuracy(groups, method),
        "total": len(rollouts),
        "num_examples": len({r["id"] for r in rollouts}),
        "truncations": sum(r["finish_reason"] == "length" for r in rollouts),
        "generated_tokens": sum(r["num_tokens"] for r in rollouts),
        "by_method": {
            m: _accuracy(groups, m)
            for m in (*EXTRACTION_METHODS, *(name for name, _ in task.filters))
        },
    }
    if task.lm_eval_task is not None and rollouts:
        summary["lm_eval"] = _lm_eval_metrics(rollouts, task)
    total = len(rollouts)
    if num_samples > 1 and total:
        grid = np.array([[r["correct"] for r in g] for g in groups], dtype=float)
        # One question has no spread between questions: its SE is undefined.
        mean, se = (
            clustered_mean_accuracy(grid) if len(groups) > 1 else (grid.mean(), None)
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
            "mean_accuracy_clustered_se": None if se is None else float(se),
        }
    return summary
