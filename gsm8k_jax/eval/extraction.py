"""Answer extraction and scoring for GSM8K.

Extraction follows lm-eval's `gsm8k` filters, extended with the `\\boxed{...}`
convention that instruction-tuned models use:

* `strict`: the last brace-balanced `\\boxed{...}`, else the first final
  answer in the task's own format: `#### N` (lm-eval's `gsm8k`
  strict-match regex) by default, `The answer is N.` for the chain-of-thought
  tasks (`tasks.Task.final_answer`).
* `flexible`: `strict`, else the last number in the text (lm-eval's
  flexible-extract regex).

Unlike lm-eval, answers are compared numerically after normalisation, so
`18.00`, `$18`, `18 dollars` and `\\frac{36}{2}` all match a gold answer of
`18`, `1.5 million` one of `1500000` and `2½` one of `2.5`; an answer that
is more than a number and its units (`\\sqrt{18}`, `not 18`, `2(3)`, `2,3`,
`3²`, `5 and a half`) is no number. A Unicode minus (`−5`) is a minus
wherever the answer is found.
"""

from __future__ import annotations

import fractions
import itertools
import re
import unicodedata
from decimal import Decimal, InvalidOperation

__all__ = [
    "EXTRACTION_METHODS",
    "HASH_FINAL_ANSWER",
    "answers_match",
    "canonical_number",
    "extract_answer",
    "gold_answer",
    "is_correct",
]

EXTRACTION_METHODS = ("strict", "flexible")

# lm-eval gsm8k strict-match and flexible-extract patterns; group 1 of a
# final-answer pattern is the answer.
HASH_FINAL_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# Vulgar fractions (`½`, `⅓`, ...), alone or after a whole number (`2½`).
_VULGAR = "\u00bc-\u00be\u2150-\u215e\u2189"
_VULGAR_FRACTION_RE = re.compile(rf"(?<!\d)(\d*)\s*([{_VULGAR}])")
# What the patterns above stop short of but belongs to their number: a
# vulgar fraction (`#### 2½`) or a power (`3²`, then no number).
_TRAILING_NUMERALS_RE = re.compile(
    rf"\s?[{_VULGAR}]|[\u00b2\u00b3\u00b9\u2070\u2074-\u2079]+"
)
_BOXED_RE = re.compile(r"\\boxed\s*\{")

# LaTeX spacing (`\!`, `\,`, `\;`, `\:`, `\ `, `~`), `{,}` thousands separators
# and style switches (`\displaystyle`).
_LATEX_SPACING_RE = re.compile(
    r"\\+[!,;: ]|\{,\}|~|\\+(?:display|text|script|scriptscript)style(?![a-z])"
)
_CURRENCY_PERCENT_RE = re.compile(r"\\*[$%]")
_TEXT_COMMAND_RE = re.compile(
    r"\\+(?:text|textbf|textit|textrm|emph|mathrm|mathbf|mathit|mbox|operatorname)"
    r"\s*\{([^{}]*)\}"
)
# A comma between digits that groups thousands (`1,000`; not `2,3`).
_THOUSANDS_SEPARATOR_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# `\frac{a}{b}`, also with single-digit arguments as in `\frac12`.
_FRAC_ARG = r"\s*(?:\{([^{}]*)\}|([0-9]))"
_FRAC_RE = re.compile(rf"\\+[dt]?frac{_FRAC_ARG}{_FRAC_ARG}")
_DECIMAL = r"[+-]?\s*(?:\d+(?:\.\d*)?|\.\d+)"
# A number or a fraction of two (each may be parenthesised, as `\frac`'s
# arguments are once rewritten), then unit words: `18`, `-0.5`, `3/4`,
# `(3)/(4)`, `18 dollars`, `2.5 km per hour`. Words before the number
# (`not 18`, `x = 18`) or a second number (`2(3)`) make it no number.
_WORD, _UNIT_SEPARATOR = r"[^\W\d_]+", r"[\s./-]+"
_NUMBER_RE = re.compile(
    rf"([+-]?)\s*\(?\s*({_DECIMAL})\s*\)?(?:\s*/\s*\(?\s*({_DECIMAL})\s*\)?)?"
    rf"\s*((?:{_WORD}(?:{_UNIT_SEPARATOR}{_WORD})*)?)[\s./-]*"
)
# Longer answers are no number (Python prints no integer of over 4,300
# digits; a response looping on digits could hold one).
_MAX_NUMBER_CHARS = 1000
# Words that name an amount: after the number they make the answer more
# than a number and its units (`5 and a half`, `2 thousand five hundred`).
_NUMBER_WORDS = frozenset(
    re.findall(
        r"\w+",
        "one two three four five six seven eight nine ten eleven twelve thirteen"
        " fourteen fifteen sixteen seventeen eighteen nineteen twenty thirty"
        " forty fifty sixty seventy eighty ninety half halves",
    )
)
# The unit words that scale the number before them (`1.5 million`, `18k`).
_SCALE_WORDS = {
    "hundred": 100,
    "thousand": 1_000,
    "k": 1_000,
    "million": 1_000_000,
    "billion": 1_000_000_000,
    "trillion": 1_000_000_000_000,
}
# Words that name an amount after a scale word or `and`.
_AMOUNT_WORDS = frozenset(_NUMBER_WORDS | _SCALE_WORDS.keys())


def _last_boxed(text: str) -> str | None:
    """Returns the content of the last brace-balanced, non-empty `\\boxed{}`."""
    for match in reversed(list(_BOXED_RE.finditer(text))):
        depth = 1
        for end in range(match.end(), len(text)):
            if text[end] == "{":
                depth += 1
            elif text[end] == "}":
                depth -= 1
                if depth == 0:
                    content = text[match.end() : end].strip()
                    if content:
                        return content
                    break
    return None


def extract_answer(
    text: str, method: str = "strict", final_answer: re.Pattern[str] = HASH_FINAL_ANSWER
) -> str | None:
    """Extracts the final answer from a model response.

    Args:
        text: The model's response.
        method: One of `EXTRACTION_METHODS`. `strict` takes the last
            `\\boxed{...}`, else the first `final_answer` match; `flexible`
            falls back further to the last number in the text.
        final_answer: The prompt's final-answer format, its group 1 the
            answer: `#### N` by default (GSM8K's solutions).

    Returns:
        The extracted answer, stripped but otherwise raw (see `canonical_number`),
        or None if nothing was found.
    """
    if method not in EXTRACTION_METHODS:
        raise ValueError(
            f"Unknown extraction method {method!r}; expected one of"
            f" {EXTRACTION_METHODS}."
        )
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    text = text.replace("\u2212", "-")  # The patterns know only "-".
    match = final_answer.search(text)
    if match:
        return _with_trailing_numerals(text, match.group(1), match.end(1))
    if method == "flexible":
        # Skip matches without digits such as an ellipsis ("...").
        numbers = [m for m in _FLEXIBLE_RE.finditer(text) if _has_digit(m.group(0))]
        if numbers:
            return _with_trailing_numerals(
                text, numbers[-1].group(0), numbers[-1].end()
            )
    return None


def _has_digit(s: str) -> bool:
    return any(c.isdigit() for c in s)


def _with_trailing_numerals(text: str, answer: str, end: int) -> str:
    """`answer`, found in `text` up to `end`, with the numerals after it."""
    trailing = _TRAILING_NUMERALS_RE.match(text, end)
    return (answer + (trailing.group(0) if trailing else "")).strip()


def _clean(s: str) -> str:
    """Removes formatting that never changes an answer's value, and lowercases."""
    s = _LATEX_SPACING_RE.sub("", s)
    s = _CURRENCY_PERCENT_RE.sub("", s)
    s = _TEXT_COMMAND_RE.sub(r" \1 ", s)
    s = s.replace("\u2212", "-")
    s = _VULGAR_FRACTION_RE.sub(_vulgar_to_division, s)
    s = " ".join(s.split()).rstrip(",. ")
    return s.casefold()


def _vulgar_to_division(match: re.Match[str]) -> str:
    """Rewrites a `_VULGAR_FRACTION_RE` match (`2½`) as ` p/q ` (` 5/2 `)."""
    whole, vulgar = match.groups()
    # unicodedata gives a float (0.333... for `⅓`); every vulgar fraction's
    # denominator is at most 10.
    part = fractions.Fraction(unicodedata.numeric(vulgar)).limit_denominator(10)
    value = fractions.Fraction(int(whole or 0)) + part
    return f" {value.numerator}/{value.denominator} "


def _frac_to_division(match: re.Match[str]) -> str:
    """Rewrites a `_FRAC_RE` match as ` (a)/(b) `."""
    numerator, denominator = (
        braced if braced is not None else digit
        for braced, digit in (match.group(1, 2), match.group(3, 4))
    )
    return f" ({numerator})/({denominator}) "


def _to_fraction(s: str) -> fractions.Fraction:
    return fractions.Fraction(Decimal(s.replace(" ", "")))


def _parse_number(s: str) -> fractions.Fraction | None:
    """Parses an answer such as `$1,000.00`, `-5 apples`, `\\frac{3}{4}` or
    `1.5 million`; None for anything else (`\\sqrt{2}`, `2,3`, `not 18`)."""
    s = _THOUSANDS_SEPARATOR_RE.sub("", _clean(s))
    # Spaces keep a mixed number such as `1\frac{1}{2}` from reading as `11/2`.
    s = _FRAC_RE.sub(_frac_to_division, s).strip()
    while s.startswith("{") and s.endswith("}"):
        s = s[1:-1].strip()
    if len(s) > _MAX_NUMBER_CHARS:
        return None
    match = _NUMBER_RE.fullmatch(s)
    if match is None:
        return None
    sign, numerator, denominator, units = match.groups()
    try:
        value = _to_fraction(numerator)
        if denominator is not None:
            value /= _to_fraction(denominator)
    except (InvalidOperation, ZeroDivisionError):
        return None
    first_unit = re.split(_UNIT_SEPARATOR, units, maxsplit=1)[0]
    if first_unit[:1].isnumeric() or _names_another_amount(units):
        return None  # A power (`3²`), or `5 and a half`: not units.
    scale = _SCALE_WORDS.get(first_unit, 1)
    return value * scale * (-1 if sign == "-" else 1)


def _names_another_amount(units: str) -> bool:
    """Whether the words after a number name a second amount: a number word
    first (`5 half`), after a leading scale word (`2 thousand five
    hundred`) or after `and` (`5 and a half`, `1 hundred and five`).
    Hyphenated words are units (`24 two-liter bottles`) unless each part
    names an amount (`1 hundred and twenty-five`)."""
    words = [w for w in units.split() if w not in ("a", "an")]
    if words and _is_amount(words[0], _NUMBER_WORDS):
        return True
    if len(words) > 1 and words[0] in _SCALE_WORDS and _is_amount(words[1]):
        return True
    return any(a == "and" and _is_amount(b) for a, b in itertools.pairwise(words))


def _is_amount(word: str, amounts: frozenset[str] = _AMOUNT_WORDS) -> bool:
    """Whether every hyphenated part of `word` names an amount (`twenty-five`,
    `one-half`; not `two-liter`)."""
    return all(part in amounts for part in word.split("-"))


def _format_number(value: fractions.Fraction) -> str:
    """Formats as an integer, an exact decimal, or `p/q` if not terminating."""
    if value.denominator == 1:
        return str(value.numerator)
    q = value.denominator
    while q % 2 == 0:
        q //= 2
    while q % 5 == 0:
        q //= 5
    if q != 1:
        return f"{value.numerator}/{value.denominator}"
    places = 1
    while 10**places % value.denominator:
        places += 1
    digits = str(abs(value.numerator) * (10**places // value.denominator))
    digits = digits.rjust(places + 1, "0")
    sign = "-" if value < 0 else ""
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


def canonical_number(s: str) -> str | None:
    """Returns the canonical form of a numeric answer, or None if not a number.

    Currency signs, thousands separators, percent signs, LaTeX spacing,
    `\\text{...}` and unit words after the number are dropped (a scale word,
    `hundred` to `trillion` or `k`, multiplies), and simple fractions are
    evaluated, so that e.g. `\\$1,000.00`, `1000 dollars` and `1k` all give
    `1000`, and `\\frac{1}{2}` and `1/2` both give `0.5`.

    Args:
        s: An extracted or gold answer.

    Returns:
        An integer (`18`), exact decimal (`0.25`) or reduced fraction (`1/3`)
        string, or None.
    """
    value = _parse_number(s)
    return None if value is None else _format_number(value)


def gold_answer(answer_text: str) -> str:
    """Returns the gold answer of a GSM8K answer text (or of a bare number).

    GSM8K convention: the text after the last `####`, commas removed.
    """
    return answer_text.rpartition("####")[2].replace(",", "").strip()


def is_correct(response: str, gold: str | float, method: str = "strict") -> bool:
    """Whether `response` answers a GSM8K problem correctly.

    Args:
        response: The model's response.
        gold: A GSM8K answer text (ending in `#### N`), a bare answer, or a
            number.
        method: How to extract the answer, one of `EXTRACTION_METHODS`.

    Returns:
        Whether the extracted answer equals the gold one numerically, or, if
        either is not a number, as text after normalisation.
    """
    predicted = extract_answer(response, method)
    return predicted is not None and answers_match(predicted, gold_answer(str(gold)))


def answers_match(a: str, b: str) -> bool:
    """Whether two extracted answers agree: numerically when both are numbers,
    else as text after normalisation."""
    value_a, value_b = _parse_number(a), _parse_number(b)
    if value_a is not None and value_b is not None:
        return value_a == value_b
    text_a, text_b = (_THOUSANDS_SEPARATOR_RE.sub("", _clean(x)) for x in (a, b))
    return text_a == text_b
