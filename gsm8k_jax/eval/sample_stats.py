"""pass@k and maj@k: estimators over several samples per question.

No jax or scipy; a run's summary (`scoring`) and a
comparison's metrics (`multi_sample`) both use them. The intervals are in
`stats`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gsm8k_jax.eval.stats import check_int

__all__ = ["maj_at_k", "majority_vote", "pass_at_k"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator of Chen et al. (2021), "Evaluating LLMs Trained on Code".

    Given ``n`` samples of which ``c`` are correct, estimates the probability
    that at least one of ``k`` samples is correct as ``1 - C(n-c, k) / C(n, k)``,
    evaluated in the numerically stable product form
    ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``.

    Args:
      n: samples drawn for the question (``>= 1``).
      c: how many of them are correct, ``0 <= c <= n``.
      k: the budget, ``1 <= k <= n``.

    Raises:
      ValueError: if ``k > n`` or any argument is out of range.
    """
    n = check_int("n", n, 1)
    c = check_int("c", c, 0)
    k = check_int("k", k, 1)
    if c > n:
        raise ValueError(f"c ({c}) must not exceed n ({n})")
    if k > n:
        raise ValueError(f"k ({k}) must not exceed n ({n}); draw at least k samples")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def majority_vote(
    answers: Sequence[str | None],
    equal: Callable[[str, str], bool] | None = None,
) -> str | None:
    """Most common non-``None`` answer; ties go to the answer seen first.

    ``None`` entries (samples from which no answer could be extracted) are
    ignored. Returns ``None`` when every entry is ``None``.

    Args:
      answers: the candidate answers for one question, in sampling order.
      equal: optional equivalence for grouping answers (e.g. numeric
        equality so that "18" and "18.0" vote together). Each answer joins the
        first group whose first member it equals; the winning group is
        represented by its first member. Defaults to exact string equality.

    Raises:
      ValueError: if ``answers`` is empty.
    """
    if len(answers) == 0:
        raise ValueError("answers is empty; need at least one candidate")
    # Groups as [representative, count], kept in order of first appearance.
    groups: list[list] = []
    if equal is None:
        index: dict[str, int] = {}
        for ans in answers:
            if ans is None:
                continue
            if ans in index:
                groups[index[ans]][1] += 1
            else:
                index[ans] = len(groups)
                groups.append([ans, 1])
    else:
        for ans in answers:
            if ans is None:
                continue
            for group in groups:
                if equal(ans, group[0]):
                    group[1] += 1
                    break
            else:
                groups.append([ans, 1])
    if not groups:
        return None
    best = groups[0]
    for group in groups[1:]:
        if group[1] > best[1]:  # strict: earlier groups win ties
            best = group
    return best[0]


def maj_at_k(
    candidates: Sequence[Sequence[str | None]],
    golds: Sequence[str],
    k: int | None = None,
    equal: Callable[[str, str], bool] | None = None,
) -> float:
    """maj@k: fraction of questions whose majority-vote answer is correct.

    Args:
      candidates: per question, the sampled answers (``None`` = unparseable).
      golds: per question, the reference answer.
      k: vote over the first ``k`` candidates of every question; ``None`` uses
        all of them. Every question must have at least ``k`` candidates.
      equal: ``equal(answer, other)`` decides both which answers vote together
        and whether the winner matches the gold; defaults to ``==``.

    A question whose candidates are all ``None`` counts as wrong.
    """
    if len(candidates) == 0:
        raise ValueError("candidates is empty; need at least one question")
    if len(candidates) != len(golds):
        raise ValueError(
            f"candidates and golds must have the same length: got {len(candidates)} "
            f"and {len(golds)}"
        )
    if k is not None:
        k = check_int("k", k, 1)
    eq = equal if equal is not None else (lambda x, y: x == y)
    num_correct = 0
    for q, (cands, gold) in enumerate(zip(candidates, golds)):
        if k is not None:
            if len(cands) < k:
                raise ValueError(
                    f"question {q} has {len(cands)} candidates, fewer than k={k}"
                )
            cands = cands[:k]
        winner = majority_vote(cands, equal=equal)
        if winner is not None and eq(winner, gold):
            num_correct += 1
    return num_correct / len(candidates)
