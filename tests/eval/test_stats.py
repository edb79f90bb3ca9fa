"""gsm8k_jax.eval.stats and sample_stats against independent computations
(scipy, brute force)."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import binomtest

from gsm8k_jax.eval import stats
from gsm8k_jax.eval.sample_stats import maj_at_k, majority_vote, pass_at_k
from gsm8k_jax.eval.stats import (
    accuracy_interval,
    clustered_mean_accuracy,
    mcnemar_exact,
    paired_bootstrap_diff,
    standard_error,
)


def paired_pattern(both, only_a, only_b, neither, seed=0):
    """Correctness vectors with the given 2x2 counts, in shuffled order."""
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    order = np.random.default_rng(seed).permutation(len(a))
    return np.array(a)[order], np.array(b)[order]


# --------------------------------------------------------------------------- #
# Single accuracy
# --------------------------------------------------------------------------- #


def test_standard_error_matches_formula_and_reference_value():
    assert standard_error(0.6, 1319) == pytest.approx(math.sqrt(0.24 / 1319), rel=1e-15)
    # 1.35 points at p = 0.6 on the 1,319 test problems.
    assert standard_error(0.6, 1319) == pytest.approx(0.01349, abs=5e-5)
    assert standard_error(0.0, 10) == 0.0
    assert standard_error(1.0, 10) == 0.0


@pytest.mark.parametrize("p, n", [(-0.1, 10), (1.1, 10), (0.5, 0), (0.5, -3)])
def test_standard_error_rejects_bad_input(p, n):
    with pytest.raises(ValueError):
        standard_error(p, n)


@pytest.mark.parametrize(
    "correct, total, confidence",
    [
        (0, 1, 0.95),
        (1, 1, 0.95),
        (0, 10, 0.95),
        (10, 10, 0.95),
        (3, 10, 0.95),
        (791, 1319, 0.95),
        (1300, 1319, 0.95),
        (5, 1319, 0.99),
        (660, 1319, 0.5),
        (42, 100, 0.9),
    ],
)
def test_accuracy_interval_matches_scipy_wilson(correct, total, confidence):
    expected = binomtest(correct, total).proportion_ci(
        confidence_level=confidence, method="wilson"
    )
    low, high = accuracy_interval(correct, total, confidence)
    assert low == pytest.approx(expected.low, rel=1e-10, abs=1e-14)
    assert high == pytest.approx(expected.high, rel=1e-10, abs=1e-14)
    assert 0.0 <= low <= correct / total <= high <= 1.0


def test_accuracy_interval_width_near_reference_value():
    low, high = accuracy_interval(791, 1319)  # p ~ 0.6
    assert (high - low) / 2 == pytest.approx(0.026, abs=0.001)  # +-2.6 points


@pytest.mark.parametrize(
    "correct, total, confidence",
    [
        (5, 0, 0.95),
        (-1, 10, 0.95),
        (11, 10, 0.95),
        (5, 10, 0.0),
        (5, 10, 1.0),
        (5, 10, 95),
    ],
)
def test_accuracy_interval_rejects_bad_input(correct, total, confidence):
    with pytest.raises(ValueError):
        accuracy_interval(correct, total, confidence)


# --------------------------------------------------------------------------- #
# McNemar
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "both, only_a, only_b, neither",
    [
        (5, 0, 0, 5),  # b + c == 0
        (0, 1, 0, 0),
        (3, 4, 4, 2),  # b == c
        (10, 0, 40, 10),  # very lopsided
        (10, 100, 3, 10),  # very lopsided, other direction
        (700, 60, 85, 474),  # n = 1319, like GSM8K
        (500, 120, 121, 578),  # n = 1319, nearly balanced
        (0, 640, 679, 0),  # n = 1319, every item discordant
        (0, 300, 1019, 0),  # n = 1319, lopsided, tiny p-value
    ],
)
def test_mcnemar_matches_scipy_binomtest(both, only_a, only_b, neither):
    a, b = paired_pattern(both, only_a, only_b, neither)
    result = mcnemar_exact(a, b)
    assert (result.b, result.c) == (only_a, only_b)
    assert result.num_items == len(a)
    assert result.num_discordant == only_a + only_b
    if only_a + only_b == 0:
        assert result.p_value == 1.0
    else:
        expected = binomtest(only_a, only_a + only_b, 0.5).pvalue
        assert result.p_value == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert 0.0 <= result.p_value <= 1.0
    # Swapping the models swaps b and c but not the p-value.
    swapped = mcnemar_exact(b, a)
    assert (swapped.b, swapped.c) == (only_b, only_a)
    assert swapped.p_value == result.p_value


def test_mcnemar_exact_against_fraction_arithmetic():
    # p = 2 * sum_{i<=3} C(20, i) / 2^20, computed with exact rationals.
    a, b = paired_pattern(0, 3, 17, 0)
    exact = 2 * Fraction(sum(math.comb(20, i) for i in range(4)), 2**20)
    assert mcnemar_exact(a, b).p_value == float(exact)


def test_mcnemar_large_n_is_fast_and_sane():
    a, b = paired_pattern(0, 2450, 2550, 0)  # n = 5000 discordant
    result = mcnemar_exact(a, b)
    expected = binomtest(2450, 5000, 0.5).pvalue
    assert result.p_value == pytest.approx(expected, rel=1e-9)
    assert 0.1 < result.p_value < 0.2


def test_mcnemar_accepts_lists_and_ints():
    result = mcnemar_exact([1, 1, 0, 0, 1], [True, False, True, True, True])
    assert (result.b, result.c) == (1, 2)


@pytest.mark.parametrize(
    "a, b, match",
    [
        ([True, False], [True], "same items"),
        ([], [], "empty"),
        ([[True]], [[True]], "one-dimensional"),
        ([0, 2], [1, 1], "0/1"),
        (["x", "y"], [True, False], "0/1"),
    ],
)
def test_paired_inputs_are_validated(a, b, match):
    with pytest.raises(ValueError, match=match):
        mcnemar_exact(a, b)
    with pytest.raises(ValueError, match=match):
        paired_bootstrap_diff(a, b, num_resamples=10)


# --------------------------------------------------------------------------- #
# Paired bootstrap
# --------------------------------------------------------------------------- #


def test_bootstrap_interval_contains_diff_and_matches_analytic_width():
    n = 1319
    a, b = paired_pattern(700, 60, 95, 464)
    true_diff = (95 - 60) / n
    result = paired_bootstrap_diff(a, b, num_resamples=10_000, seed=1)
    assert result.diff == pytest.approx(true_diff, rel=1e-12)
    assert result.low < true_diff < result.high
    # Analytic paired SE of the mean difference d_i = b_i - a_i.
    d = b.astype(float) - a.astype(float)
    paired_se = d.std(ddof=0) / math.sqrt(n)
    assert result.std_error == pytest.approx(paired_se, rel=0.05)
    assert result.high - result.low == pytest.approx(2 * 1.96 * paired_se, rel=0.06)
    # The paired interval is far narrower than the unpaired one would be.
    unpaired_se = math.sqrt(
        standard_error(a.mean(), n) ** 2 + standard_error(b.mean(), n) ** 2
    )
    assert result.high - result.low < 0.6 * (2 * 1.96 * unpaired_se)


def test_bootstrap_uses_same_indices_for_both_models():
    # Identical models: every resampled difference is exactly 0 only if both
    # vectors are resampled with the same indices.
    a, _ = paired_pattern(300, 200, 0, 500)
    result = paired_bootstrap_diff(a, a.copy(), num_resamples=2000)
    assert result.diff == result.low == result.high == result.std_error == 0.0


def test_bootstrap_sign_is_b_minus_a():
    a, b = paired_pattern(10, 0, 30, 10)
    result = paired_bootstrap_diff(a, b, num_resamples=500)
    assert result.diff == pytest.approx(0.6)
    assert result.low > 0
    flipped = paired_bootstrap_diff(b, a, num_resamples=500)
    assert flipped.diff == pytest.approx(-0.6)
    assert flipped.high < 0


def test_bootstrap_is_deterministic_and_independent_of_chunking(monkeypatch):
    a, b = paired_pattern(50, 20, 30, 23)
    first = paired_bootstrap_diff(a, b, num_resamples=777, seed=3)
    assert paired_bootstrap_diff(a, b, num_resamples=777, seed=3) == first
    assert paired_bootstrap_diff(a, b, num_resamples=777, seed=4) != first
    monkeypatch.setattr(stats, "_BOOTSTRAP_CHUNK_ELEMENTS", 5 * len(a) + 1)
    assert paired_bootstrap_diff(a, b, num_resamples=777, seed=3) == first


def test_bootstrap_percentiles_match_a_plain_loop():
    a, b = paired_pattern(40, 15, 25, 20)
    result = paired_bootstrap_diff(a, b, num_resamples=400, confidence=0.9, seed=7)
    rng = np.random.default_rng(7)
    diffs = []
    for _ in range(400):
        idx = rng.integers(0, len(a), size=len(a))
        diffs.append(b[idx].mean() - a[idx].mean())
    assert result.low == pytest.approx(np.percentile(diffs, 5), abs=1e-12)
    assert result.high == pytest.approx(np.percentile(diffs, 95), abs=1e-12)
    assert result.confidence == 0.9 and result.num_resamples == 400


@pytest.mark.parametrize("kwargs", [{"num_resamples": 0}, {"confidence": 1.5}])
def test_bootstrap_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        paired_bootstrap_diff([True, False], [False, True], **kwargs)


# --------------------------------------------------------------------------- #
# pass@k
# --------------------------------------------------------------------------- #


def brute_force_pass_at_k(n, c, k):
    """Fraction of all k-subsets of n samples (c correct) containing a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(any(samples[i] for i in subset) for subset in subsets)
    return hits / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(
                brute_force_pass_at_k(n, c, k), rel=1e-12, abs=1e-15
            ), (n, c, k)


@pytest.mark.parametrize(
    "n, c", [(1, 0), (1, 1), (16, 3), (100, 37), (200, 0), (200, 200)]
)
def test_pass_at_k_known_values(n, c):
    assert pass_at_k(n, c, 1) == pytest.approx(c / n, rel=1e-12, abs=1e-15)
    assert pass_at_k(n, c, n) == (1.0 if c > 0 else 0.0)


def test_pass_at_k_large_n_matches_exact_ratio():
    n, c, k = 500, 7, 40
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize(
    "n, c, k", [(4, 2, 5), (4, 5, 1), (4, 2, 0), (0, 0, 1), (4, -1, 1)]
)
def test_pass_at_k_rejects_bad_input(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


@pytest.mark.parametrize("n, c, k", [(4.0, 2, 1), (4, True, 1), (4, 2, 1.5)])
def test_pass_at_k_rejects_non_integers(n, c, k):
    with pytest.raises(TypeError, match="integer"):
        pass_at_k(n, c, k)


# --------------------------------------------------------------------------- #
# Majority vote
# --------------------------------------------------------------------------- #


def test_majority_vote_basic_and_ties():
    assert majority_vote(["3", "5", "5", "3", "5"]) == "5"
    assert majority_vote(["3", "5", "5", "3"]) == "3"  # tie: first seen wins
    assert majority_vote(["5", "3", "3", "5"]) == "5"
    assert majority_vote([None, "7", None, None]) == "7"  # None never votes
    assert majority_vote([None, "2", "4", None, "4"]) == "4"
    assert majority_vote([None, None]) is None


def test_majority_vote_with_equality_function():
    numeric = lambda x, y: float(x) == float(y)
    answers = ["18", "20", "18.0", "20"]
    assert majority_vote(answers) == "20"
    assert majority_vote(answers, equal=numeric) == "18"  # tie 2-2, "18" seen first
    assert majority_vote(["20", "18", "18.0"], equal=numeric) == "18"


def test_majority_vote_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        majority_vote([])


def test_maj_at_k():
    candidates = [
        ["1", "2", "2", "2"],  # maj@3 = "2", maj@4 = "2"
        ["5", "5", "6", "6"],  # "5" either way (tie -> first)
        [None, "9", "8", "8"],  # maj@3 = "9" (tie with "8" -> first), maj@4 = "8"
        [None, None, None, None],  # never correct
    ]
    golds = ["2", "6", "8", "0"]
    assert maj_at_k(candidates, golds) == pytest.approx(2 / 4)
    assert maj_at_k(candidates, golds, k=3) == pytest.approx(1 / 4)
    assert maj_at_k(candidates, golds, k=1) == pytest.approx(0 / 4)
    numeric = lambda x, y: float(x) == float(y)
    assert maj_at_k([["2.0", "3"]], ["2"]) == 0.0
    assert maj_at_k([["2.0", "3"]], ["2"], equal=numeric) == 1.0


@pytest.mark.parametrize(
    "candidates, golds, k",
    [
        ([["1"]], ["1", "2"], None),
        ([], [], None),
        ([["1", "2"]], ["1"], 3),
        ([["1"]], ["1"], 0),
    ],
)
def test_maj_at_k_rejects_bad_input(candidates, golds, k):
    with pytest.raises(ValueError):
        maj_at_k(candidates, golds, k=k)


# --------------------------------------------------------------------------- #
# Clustered mean accuracy
# --------------------------------------------------------------------------- #


def direct_clustered(correct):
    rows = [[float(x) for x in row] for row in correct]
    means = [sum(row) / len(row) for row in rows]
    q = len(means)
    overall = sum(sum(row) for row in rows) / sum(len(row) for row in rows)
    grand = sum(means) / q
    var = sum((m - grand) ** 2 for m in means) / (q - 1)
    return overall, math.sqrt(var) / math.sqrt(q)


@pytest.mark.parametrize("shape, p", [((50, 4), 0.3), ((1319, 8), 0.6), ((2, 1), 0.5)])
def test_clustered_mean_accuracy_matches_direct_computation(shape, p):
    rng = np.random.default_rng(11)
    difficulty = rng.uniform(size=(shape[0], 1))
    correct = rng.uniform(size=shape) < (difficulty * 2 * p).clip(0, 1)
    mean, se = clustered_mean_accuracy(correct)
    exp_mean, exp_se = direct_clustered(correct)
    assert mean == pytest.approx(exp_mean, rel=1e-12)
    assert se == pytest.approx(exp_se, rel=1e-10)
    assert mean == pytest.approx(correct.mean(), rel=1e-12)


def test_clustered_se_exceeds_naive_se_when_samples_agree():
    # Each question is solved by all or none of its 8 samples: the effective
    # sample size is the number of questions, not questions * samples.
    correct = np.repeat(np.arange(100)[:, None] % 2 == 0, 8, axis=1)
    mean, se = clustered_mean_accuracy(correct.astype(int))
    assert mean == 0.5
    assert se == pytest.approx(math.sqrt(0.25 * 100 / 99) / math.sqrt(100), rel=1e-12)
    assert se > 2.5 * standard_error(mean, correct.size)


@pytest.mark.parametrize(
    "correct",
    [
        np.zeros(5, bool),
        np.zeros((0, 4), bool),
        np.zeros((3, 0), bool),
        np.zeros((1, 4), bool),
        np.full((3, 2), 2),
    ],
)
def test_clustered_rejects_bad_input(correct):
    with pytest.raises(ValueError):
        clustered_mean_accuracy(correct)


def test_holm_rejects_as_its_adjusted_p_values_say():
    """Holm's step-down against its adjusted p-values (the running maximum of
    (m - rank) * p over the sorted p-values), on random and on tied p-values;
    one test is p < level."""
    rng = np.random.default_rng(0)
    for m in (1, 2, 3, 5, 8):
        for _ in range(200):
            p = rng.choice([*rng.uniform(0, 0.1, size=m), 0.0125, 0.025], size=m)
            order = np.argsort(p, kind="stable")
            adjusted = np.maximum.accumulate(
                np.minimum(1, (m - np.arange(m)) * p[order])
            )
            expected = np.empty(m, bool)
            expected[order] = adjusted < 0.05
            assert stats.holm_rejections(list(p), 0.05) == expected.tolist()
    assert stats.holm_rejections([0.049], 0.05) == [True]
    assert stats.holm_rejections([0.01, 0.04, 0.03, 0.005], 0.05) == [
        True,
        False,
        False,
        True,
    ]


def test_paired_bootstrap_of_shares():
    """Items may be each question's share of correct samples: on 0/1 shares
    it is the bootstrap of correctness; on shares its standard error is the
    paired difference's (std / sqrt(n)) within 5%."""
    rng = np.random.default_rng(1)
    a, b = rng.random(300) < 0.4, rng.random(300) < 0.5
    assert stats.paired_bootstrap_diff(
        a.astype(float), b.astype(float), 500, seed=3
    ) == stats.paired_bootstrap_diff(a, b, 500, seed=3)
    a_shares, b_shares = rng.integers(0, 9, 400) / 8, rng.integers(0, 9, 400) / 8
    result = stats.paired_bootstrap_diff(a_shares, b_shares, 20_000)
    d = b_shares - a_shares
    assert result.diff == pytest.approx(d.mean())
    assert result.std_error == pytest.approx(d.std(ddof=1) / 20, rel=0.05)
    with pytest.raises(ValueError, match=r"shares in \[0, 1\]"):
        stats.paired_bootstrap_diff([0.5, 1.5], [0.5, 0.5])
