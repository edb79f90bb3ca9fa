"""Statistics for reporting and comparing GSM8K accuracies honestly.

Everything here is plain numpy + the standard library (no scipy at runtime):

* :func:`accuracy_interval` / :func:`standard_error`: uncertainty of a single
  accuracy measured on ``n`` items.
* :func:`mcnemar_exact` / :func:`paired_bootstrap_diff`: comparing two models
  (or checkpoints) evaluated on the *same* items, using the paired view.
* :func:`clustered_mean_accuracy` / :func:`clustered_accuracy_interval`: the
  accuracy of several samples per question, clustered by question (pass@k
  and maj@k are in `sample_stats`).

Conventions: "A" is the baseline and "B" the candidate; differences are always
reported as ``B - A``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "BootstrapResult",
    "McNemarResult",
    "accuracy_interval",
    "clustered_mean_accuracy",
    "holm_rejections",
    "mcnemar_exact",
    "paired_bootstrap_diff",
    "standard_error",
]

# Upper bound on the resampled items materialised at once by the bootstrap:
# 4M int64 indices and the 4M float64 differences they pick (32 MiB each);
# resamples are processed in chunks.
_BOOTSTRAP_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- #
# Validation helpers
# --------------------------------------------------------------------------- #


def _check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return confidence


def check_int(name: str, value: int, minimum: int) -> int:
    """`value`, the integer argument `name`, if it is at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _vector(name: str, values: Sequence[Any] | np.ndarray) -> np.ndarray:
    """`values` as a non-empty 1-D array."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; need at least one item")
    return arr


def _as_bool_vector(name: str, values: Sequence[bool] | np.ndarray) -> np.ndarray:
    """Converts a 1-D sequence of booleans (or 0/1 numbers) to a bool array."""
    return _to_bool(name, _vector(name, values))


def _to_bool(name: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.bool_:
        return arr
    if not (np.issubdtype(arr.dtype, np.number)):
        raise ValueError(f"{name} must contain booleans or 0/1, got dtype {arr.dtype}")
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name} must contain only booleans or 0/1 values")
    return arr.astype(bool)


def _as_share_vector(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    """A 1-D sequence of shares in [0, 1] (or booleans) as a float64 array."""
    arr = _vector(name, values)
    numeric = arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.number)
    if not numeric or not np.all((arr >= 0) & (arr <= 1)):
        raise ValueError(f"{name} must hold booleans, 0/1 or shares in [0, 1]")
    return arr.astype(np.float64)


def _paired(
    a_correct: Sequence[Any] | np.ndarray,
    b_correct: Sequence[Any] | np.ndarray,
    as_vector: Callable[[str, Any], np.ndarray] = _as_bool_vector,
) -> tuple[np.ndarray, np.ndarray]:
    """Both runs' per-item scores (`as_vector`'s), of the same items."""
    a = as_vector("a_correct", a_correct)
    b = as_vector("b_correct", b_correct)
    if a.shape != b.shape:
        raise ValueError(
            "a_correct and b_correct must score the same items: got lengths "
            f"{a.shape[0]} and {b.shape[0]}"
        )
    return a, b


# --------------------------------------------------------------------------- #
# One accuracy
# --------------------------------------------------------------------------- #


def standard_error(p: float, n: int) -> float:
    """Binomial standard error ``sqrt(p * (1 - p) / n)`` of an accuracy.

    Args:
      p: the observed accuracy, in ``[0, 1]``.
      n: the number of items it was measured on (``>= 1``).

    At ``p = 0.6`` and ``n = 1319`` (the GSM8K test set) this is about 0.0135,
    i.e. 1.35 accuracy points.
    """
    n = check_int("n", n, 1)
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    return math.sqrt(p * (1.0 - p) / n)


def accuracy_interval(
    correct: int, total: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Wilson score interval for an accuracy of ``correct / total``.

    The Wilson score interval (without continuity correction) behaves well near
    0 and 1 and for small ``total``, unlike the normal ("Wald") interval; it is
    what ``scipy.stats.binomtest(correct, total).proportion_ci(method="wilson")``
    returns.

    Args:
      correct: number of correct items, ``0 <= correct <= total``.
      total: number of items, ``>= 1``.
      confidence: two-sided confidence level in ``(0, 1)``.

    Returns:
      ``(low, high)``, both in ``[0, 1]``.
    """
    total = check_int("total", total, 1)
    correct = check_int("correct", correct, 0)
    if correct > total:
        raise ValueError(f"correct ({correct}) must not exceed total ({total})")
    confidence = _check_confidence(confidence)
    return _wilson(correct / total, float(total), confidence)


def _wilson(p: float, n: float, confidence: float) -> tuple[float, float]:
    """Wilson's interval of a proportion `p` observed on `n` items (`n` may be
    an effective, non-integer count)."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2.0 * n)) / denom
    half = (z / denom) * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    low = 0.0 if p == 0 else max(0.0, center - half)
    high = 1.0 if p == 1 else min(1.0, center + half)
    return low, high


def clustered_accuracy_interval(
    correct: np.ndarray, confidence: float = 0.95
) -> tuple[float, float]:
    """Wilson's interval of the accuracy of a [questions, samples] grid, on
    the number of independent items the grid is worth.

    Samples of one question are correlated, so the grid is worth fewer than
    its ``questions * samples`` items: ``p (1 - p) / SE**2`` with the
    question-clustered SE (`clustered_mean_accuracy`), kept between the
    number of questions and of samples. Unlike ``mean +- z SE``, this never
    collapses to a point when every question has the same share right (all
    wrong, all right), where the SE is 0: all wrong or all right is worth
    one item per question, and equal shares strictly between worth every
    sample.

    A lone question has no SE (no other question to compare its samples
    with): it is worth one item.

    Raises:
      ValueError: as `clustered_mean_accuracy` (e.g. an empty grid).
    """
    confidence = _check_confidence(confidence)
    arr = np.asarray(correct)
    if arr.ndim == 2 and arr.shape[0] == 1 and arr.size:
        return _wilson(float(_to_bool("correct", arr).mean()), 1.0, confidence)
    p, se = clustered_mean_accuracy(arr)
    num_questions, num_samples = arr.shape
    total = num_questions * num_samples
    if p in (0.0, 1.0):
        effective = float(num_questions)
    elif se == 0:
        effective = float(total)
    else:
        effective = min(max(p * (1 - p) / se**2, num_questions), total)
    return _wilson(p, effective, confidence)


def grid_accuracy_interval(
    correct: np.ndarray, confidence: float = 0.95
) -> tuple[tuple[float, float], str]:
    """The `confidence` interval of a [questions, samples] grid's accuracy
    and its kind: "clustered" (`clustered_accuracy_interval`) with several
    samples per question, else "wilson" over all items."""
    arr = np.asarray(correct, dtype=bool)
    if arr.shape[1] > 1:
        return clustered_accuracy_interval(arr, confidence), "clustered"
    return accuracy_interval(int(arr.sum()), arr.size, confidence), "wilson"


# --------------------------------------------------------------------------- #
# Two models on the same items
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class McNemarResult:
    """Outcome of :func:`mcnemar_exact`.

    Attributes:
      b: items A got right and B got wrong.
      c: items A got wrong and B got right.
      num_items: total number of paired items (concordant ones included).
      p_value: two-sided exact p-value (binomial with ``b + c`` trials at 0.5).
    """

    b: int
    c: int
    num_items: int
    p_value: float

    @property
    def num_discordant(self) -> int:
        """``b + c``, the number of items on which A and B disagree."""
        return self.b + self.c


def _binom_half_lower_tail(k: int, n: int) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, 1/2)``, computed exactly.

    Sums binomial coefficients as Python integers (exact for any ``n``) and
    divides by ``2**n`` once; int/int true division is correctly rounded and
    underflows gracefully to 0.0 for astronomically small tails.
    """
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    term = 1  # C(n, 0)
    total = 1
    for i in range(k):
        term = term * (n - i) // (i + 1)  # C(n, i + 1), exact
        total += term
    return total / (1 << n)


def mcnemar_exact(
    a_correct: Sequence[bool] | np.ndarray, b_correct: Sequence[bool] | np.ndarray
) -> McNemarResult:
    """Exact McNemar test for two models scored on the same items.

    Only the discordant items carry information: ``b`` (A right, B wrong) and
    ``c`` (A wrong, B right). Under the null hypothesis that both models are
    equally accurate, ``b ~ Binomial(b + c, 1/2)``. The two-sided p-value is
    ``min(1, 2 * P(X <= min(b, c)))`` (the binomial at 0.5 is symmetric, so
    this equals scipy's ``binomtest(b, b + c, 0.5).pvalue``); it is ``1.0`` when
    ``b + c == 0``. Computed with exact integer arithmetic, so it is accurate
    for any number of items.

    Args:
      a_correct: per-item correctness of model A (bools or 0/1).
      b_correct: per-item correctness of model B, same items in the same order.
    """
    a, b_arr = _paired(a_correct, b_correct)
    b = int(np.count_nonzero(a & ~b_arr))
    c = int(np.count_nonzero(~a & b_arr))
    n = b + c
    if n == 0:
        p_value = 1.0
    else:
        p_value = min(1.0, 2.0 * _binom_half_lower_tail(min(b, c), n))
    return McNemarResult(b=b, c=c, num_items=int(a.shape[0]), p_value=p_value)


def holm_rejections(p_values: Sequence[float], level: float) -> list[bool]:
    """Which of several tests' null hypotheses Holm's step-down method
    rejects at family-wise error `level`: the i-th smallest p-value (from
    0) must be below level / (m - i), and so must every smaller one. With
    one test this is `p < level`."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] >= level / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected


@dataclass(frozen=True)
class BootstrapResult:
    """Outcome of :func:`paired_bootstrap_diff`.

    Attributes:
      diff: observed ``mean(b_correct) - mean(a_correct)`` (B minus A).
      low: lower end of the percentile interval for the difference.
      high: upper end of the percentile interval for the difference.
      std_error: standard deviation of the bootstrap differences.
      confidence: the two-sided confidence level of ``(low, high)``.
      num_resamples: number of bootstrap resamples drawn.
    """

    diff: float
    low: float
    high: float
    std_error: float
    confidence: float
    num_resamples: int


def paired_bootstrap_diff(
    a_correct: Sequence[float] | np.ndarray,
    b_correct: Sequence[float] | np.ndarray,
    num_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Paired bootstrap confidence interval of the accuracy difference B - A.

    Each resample draws ``n`` item indices with replacement and uses the *same*
    indices for both models, so the interval reflects the paired design (it is
    much narrower than treating the two accuracies as independent when the
    models agree on most items). The interval is the percentile interval of the
    resampled differences. Resamples are processed in chunks so memory stays
    bounded (about 64 MiB of indices and picked differences) whatever
    ``num_resamples`` is; the result depends only on ``seed``, not on the
    chunking.

    An item may also be a question's share of correct samples, for runs of
    several samples per question (each its own run's k): the questions are
    resampled, so correlated samples of one question count as one item.

    Args:
      a_correct: per-item correctness of model A (bools, 0/1, or shares in
        [0, 1]).
      b_correct: per-item correctness of model B, same items in the same order.
      num_resamples: number of bootstrap resamples (``>= 1``).
      confidence: two-sided confidence level in ``(0, 1)``.
      seed: seed for ``numpy.random.default_rng``.
    """
    a, b = _paired(a_correct, b_correct, _as_share_vector)
    num_resamples = check_int("num_resamples", num_resamples, 1)
    confidence = _check_confidence(confidence)
    d = b - a  # Per-item difference; a mean over resampled items is B - A's.
    n = d.shape[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    diffs = np.empty(num_resamples, dtype=np.float64)
    for start in range(0, num_resamples, chunk):
        stop = min(start + chunk, num_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        diffs[start:stop] = d[idx].sum(axis=1) / n

    alpha = 1.0 - confidence
    low, high = np.quantile(diffs, [alpha / 2.0, 1.0 - alpha / 2.0])
    return BootstrapResult(
        diff=float(d.mean(dtype=np.float64)),
        low=float(low),
        high=float(high),
        std_error=float(diffs.std(ddof=1)) if num_resamples > 1 else 0.0,
        confidence=confidence,
        num_resamples=num_resamples,
    )


# --------------------------------------------------------------------------- #
# Several samples per question
# --------------------------------------------------------------------------- #


def clustered_mean_accuracy(correct: np.ndarray) -> tuple[float, float]:
    """Mean accuracy over all samples, with a question-clustered standard error.

    Samples of the same question are correlated (an easy question is solved by
    almost every sample), so treating all ``questions * samples`` outcomes as
    independent understates the uncertainty. Instead each question is one
    cluster:

    * ``mean`` is the accuracy over all samples (equal to the mean of the
      per-question accuracies, since every question has the same number of
      samples);
    * ``SE = std(per_question_means, ddof=1) / sqrt(num_questions)``.

    Args:
      correct: array of shape ``[questions, samples]`` of bools or 0/1.

    Returns:
      ``(mean, standard_error)``.

    Raises:
      ValueError: if the array is not 2-D, is empty, or has fewer than two
        questions (the sample standard deviation needs at least two).
    """
    arr = np.asarray(correct)
    if arr.ndim != 2:
        raise ValueError(
            f"correct must have shape [questions, samples], got shape {arr.shape}"
        )
    num_questions, num_samples = arr.shape
    if num_questions == 0 or num_samples == 0:
        raise ValueError(f"correct is empty (shape {arr.shape})")
    if num_questions < 2:
        raise ValueError("need at least two questions for a clustered standard error")
    per_question = _to_bool("correct", arr).mean(axis=1, dtype=np.float64)
    mean = float(per_question.mean())
    se = float(per_question.std(ddof=1) / math.sqrt(num_questions))
    return mean, se
