"""A run's summary: its accuracy interval, with one and with several samples
per question, against independent computations."""

from statistics import NormalDist

import numpy as np
import pytest
import scipy.stats

from gsm8k_jax.eval.scoring import score, summarize
from gsm8k_jax.eval.tasks import get_task


def rollouts(grid):
    """Rollouts of problems answered 7, sample s of question i right where
    grid[i][s]."""
    return [
        {
            "id": i,
            "sample_index": s,
            "gold": "7",
            "reference_solution": "3 + 4 = 7\n#### 7",
            "response": "\\boxed{7}" if right else "\\boxed{8}",
            "finish_reason": "eos",
            "num_tokens": 3,
        }
        for i, row in enumerate(grid)
        for s, right in enumerate(row)
    ]


def test_one_sample_per_question_has_wilsons_interval():
    grid = [[True]] * 13 + [[False]] * 7
    summary = summarize(rollouts(grid), 1, "strict", get_task("boxed"))
    expected = scipy.stats.binomtest(13, 20).proportion_ci(0.95, method="wilson")
    assert summary["accuracy"] == 13 / 20
    assert summary["accuracy_ci95"] == pytest.approx([expected.low, expected.high])
    assert summary["accuracy_ci95_method"] == "wilson"


def wilson(p, n, confidence=0.95):
    """Wilson's score interval, written out (n may be fractional)."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, center - half), min(1.0, center + half)]


def test_several_samples_per_question_cluster_the_interval():
    """Each question solved by all or none of its 8 samples: 80 rows carry
    only 10 questions' worth of evidence, and the interval says so."""
    grid = [[True] * 8] * 5 + [[False] * 8] * 5
    summary = summarize(rollouts(grid), 8, "strict", get_task("boxed"))
    assert summary["accuracy"] == 0.5
    assert summary["accuracy_ci95_method"] == "clustered"
    expected = scipy.stats.binomtest(5, 10).proportion_ci(0.95, method="wilson")
    assert summary["accuracy_ci95"] == pytest.approx([expected.low, expected.high])
    assert summary["by_method"]["strict"]["accuracy_ci95"] == summary["accuracy_ci95"]


@pytest.mark.parametrize("right", [4, 2, 0])
def test_a_lone_question_is_worth_one_item_whatever_its_samples(right):
    """One question of 4 samples: no other question to estimate their
    correlation with, so its share right counts as one item (never as 4
    independent ones, which made one question's interval narrower than two
    questions'), and its clustered SE is undefined."""
    summary = summarize(
        rollouts([[i < right for i in range(4)]]), 4, "strict", get_task("boxed")
    )
    assert summary["accuracy"] == right / 4
    assert summary["accuracy_ci95_method"] == "clustered"
    assert summary["accuracy_ci95"] == pytest.approx(wilson(right / 4, 1))
    if right in (0, 4):  # A whole item: scipy's Wilson of 0 or 1 out of 1.
        expected = scipy.stats.binomtest(right // 4, 1).proportion_ci(method="wilson")
        assert summary["accuracy_ci95"] == pytest.approx([expected.low, expected.high])
    assert summary["mean_accuracy_clustered_se"] is None


def test_clustered_interval_uses_the_design_effect():
    """Partly correlated samples: the grid is worth p(1-p)/SE^2 items, SE
    clustered by question."""
    shares = [4, 4, 3, 1, 0, 0, 2, 2]  # right samples of 4, per question
    grid = [[s > i for i in range(4)] for s in shares]
    summary = summarize(rollouts(grid), 4, "strict", get_task("boxed"))
    per_question = np.mean(grid, axis=1)
    p = per_question.mean()
    se = per_question.std(ddof=1) / np.sqrt(len(grid))
    effective = p * (1 - p) / se**2
    assert len(grid) < effective < np.size(grid)
    assert summary["accuracy_ci95"] == pytest.approx(wilson(p, effective))


@pytest.mark.parametrize(
    "grid, worth",
    [
        ([[False] * 4] * 6, 6),  # All wrong: one item per question.
        ([[True] * 4] * 6, 6),  # All right: likewise.
        ([[True, False] * 2] * 6, 24),  # Every question half right: SE is 0.
    ],
)
def test_clustered_interval_never_collapses_to_a_point(grid, worth):
    """Where the clustered SE is 0, mean +- z SE would be a point."""
    summary = summarize(rollouts(grid), 4, "strict", get_task("boxed"))
    correct = round(summary["accuracy"] * worth)
    expected = scipy.stats.binomtest(correct, worth).proportion_ci(0.95, "wilson")
    low, high = summary["accuracy_ci95"]
    assert (low, high) == pytest.approx((expected.low, expected.high))
    assert high - low > 0.1


def test_runs_from_before_reference_solutions_are_scored():
    """Rollouts written before 2026-12-01 have no reference_solution."""
    old = [
        {k: v for k, v in r.items() if k != "reference_solution"}
        for r in rollouts([[True], [False]])
    ]
    summary = summarize(old, 1, "strict", get_task("boxed"))
    assert summary["correct"] == 1 and summary["total"] == 2


def test_several_samples_give_pass_maj_and_lm_evals_first_sample():
    """pass@k: a question counts if any sample is right; maj@k: if its most
    common answer is; lm-eval's figures read each question's first sample,
    as lm-eval scores one response per document."""
    answers = [[7, 8, 8, 9], [7, 7, 8, 9], [8, 8, 8, 8], [7, 8, 7, 9]]  # gold: 7
    rows = [
        {
            "id": i,
            "sample_index": s,
            "gold": "7",
            "reference_solution": "3 + 4 = 7\n#### 7",
            "response": f"3 + 4 = {a}\n#### {a}",
            "finish_reason": "eos",
            "num_tokens": 9,
        }
        for i, row in enumerate(answers)
        for s, a in enumerate(row)
    ]
    summary = summarize(rows, 4, "strict", get_task("gsm8k"))
    right = [[a == 7 for a in row] for row in answers]
    assert summary["accuracy"] == np.mean(right) == 5 / 16
    assert summary["pass@4"] == np.mean([any(r) for r in right]) == 3 / 4
    majority = [max(set(row), key=row.count) == 7 for row in answers]
    assert summary["maj@4"] == np.mean(majority) == 2 / 4
    first = np.mean([row[0] == 7 for row in answers])
    assert summary["lm_eval"]["exact_match,strict-match"] == first == 3 / 4
    assert summary["lm_eval"]["exact_match_stderr,strict-match"] == pytest.approx(
        np.std([row[0] == 7 for row in answers], ddof=1) / 2
    )


@pytest.mark.parametrize("task_name", ["gsm8k_cot", "gsm8k_cot_zeroshot"])
@pytest.mark.parametrize(
    "response, correct",
    [
        ("18 - 0 = 18. The answer is 18.", True),
        ("18 - 0 = 18. The answer is 18", True),  # the response ends at eos
        ("The answer is 185", False),
        ("The answer is 1", False),
    ],
)
def test_chain_of_thought_answers_are_read_whole(task_name, response, correct):
    """Our methods read the whole number after "The answer is", also where it
    ends the response (lm-eval's strict-match, whose pattern ends in an
    unescaped `.`, then drops its last digit; tests/eval/test_lm_eval_filters.py
    checks that filter against lm-eval's own)."""
    solution = "9 * 2 = 18\n#### 18"
    scored = score(response, "18", solution, "strict", get_task(task_name))
    assert scored["correct_by_method"]["strict"] is correct
    assert scored["correct_by_method"]["flexible"] is correct
