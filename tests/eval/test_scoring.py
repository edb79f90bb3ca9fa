"""A run's summary: its accuracy interval, with one and with several samples
per question, against independent computations."""

from statistics import NormalDist

import numpy as np
import pytest
import scipy.stats

from gsm8k_jax.eval.scoring import summarize
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


def test_several_samples_per_question_cluster_the_interval():
    """Each question solved by all or none of its 8 samples: 80 rows carry
    only 10 questions' worth of evidence, and the interval says so."""
    grid = [[True] * 8] * 5 + [[False] * 8] * 5
    summary = summarize(rollouts(grid), 8, "strict", get_task("boxed"))
    per_question = np.mean(grid, axis=1)
    half = NormalDist().inv_cdf(0.975) * per_question.std(ddof=1) / np.sqrt(10)
    assert summary["accuracy"] == 0.5
    assert summary["accuracy_ci95"] == pytest.approx([0.5 - half, 0.5 + half])
    assert summary["accuracy_ci95_method"] == "clustered"
    by_strict = summary["by_method"]["strict"]
    assert by_strict["accuracy_ci95"] == summary["accuracy_ci95"]
    # Wilson's over the 80 rows as if independent is far narrower.
    wilson = scipy.stats.binomtest(40, 80).proportion_ci(0.95, method="wilson")
    assert wilson.high - wilson.low < 0.5 * (2 * half)
