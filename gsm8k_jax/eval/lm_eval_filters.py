"""lm-evaluation-harness' GSM8K scoring: its two answer filters and exact_match.

lm-eval scores every GSM8K response twice, under `strict-match` (the
task's own answer format) and `flexible-extract` (the last number), each
compared to the reference with `exact_match` after removing commas, `$`,
everything up to `#### ` and one trailing period, ignoring case. Nothing
is normalised beyond that (`18.00` is not `18`), which is why our runs also
keep their own numeric score (extraction.py).

Reproduced here because lm-eval is an optional dependency: a run reports
the figures lm-eval would, under lm-eval's metric names
(`exact_match,strict-match`), and tests/eval/test_lm_eval_filters.py checks
them against lm-eval's own filters and metric.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

__all__ = [
    "FLEXIBLE_EXTRACT",
    "INVALID",
    "STRICT_MATCH",
    "RegexFilter",
    "exact_match",
    "mean_and_stderr",
]

STRICT_MATCH = "strict-match"
FLEXIBLE_EXTRACT = "flexible-extract"
# What lm-eval's regex filter answers when nothing matches; we store None.
INVALID = "[invalid]"

# The `regexes_to_ignore` of every GSM8K task's exact_match, applied in order.
_IGNORED = (",", r"\$", r"(?s).*#### ", r"\.$")


@dataclasses.dataclass(frozen=True)
class RegexFilter:
    """lm-eval's `regex` filter followed by `take_first`.

    Attributes:
      pattern: the task's `regex_pattern`.
      group_select: which of all matches to keep (0 the first, -1 the last).
    """

    pattern: str
    group_select: int = 0

    def __call__(self, response: str) -> str | None:
        """The filtered answer, or None where lm-eval answers `[invalid]`."""
        matches = re.findall(self.pattern, response)
        if not matches:
            return None
        match = matches[self.group_select]
        if isinstance(match, tuple):  # Several groups: the first non-empty one.
            match = next((group for group in match if group), None)
            if match is None:
                return None
        return match.strip()


def _ignoring_format(text: str) -> str:
    for pattern in _IGNORED:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match(answer: str | None, reference: str) -> bool:
    """lm-eval's GSM8K exact_match of a filtered answer (None: `[invalid]`)
    and the task's reference (its `doc_to_target`)."""
    answer = INVALID if answer is None else answer
    return _ignoring_format(answer) == _ignoring_format(reference)


def mean_and_stderr(scores: Sequence[bool]) -> tuple[float, float | str]:
    """lm-eval's `mean` aggregation and its standard error, computed as lm-eval
    computes them (sample standard deviation / sqrt(n); "N/A" below two)."""
    values = [float(s) for s in scores]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, "N/A"
    stddev = math.sqrt(sum([(x - mean) ** 2 for x in values]) / (len(values) - 1))
    return mean, stddev / math.sqrt(len(values))
