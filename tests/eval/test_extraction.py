"""Answer extraction, number normalisation and scoring."""

import pytest

from gsm8k_jax.eval.data import load_gsm8k
from gsm8k_jax.eval.extraction import (
    EXTRACTION_METHODS,
    canonical_number,
    extract_answer,
    gold_answer,
    is_correct,
)


@pytest.mark.parametrize("method", EXTRACTION_METHODS)
def test_recovers_gold_from_every_reference_answer(method):
    examples = load_gsm8k()
    assert len(examples) == 1319
    for ex in examples:
        extracted = extract_answer(ex.answer, method)
        assert canonical_number(extracted) == ex.gold, ex.id
        assert is_correct(ex.answer, ex.answer, method), ex.id
        assert is_correct(ex.answer, ex.gold, method), ex.id


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"So the answer is \boxed{18}.", "18"),
        (r"\boxed {42}", "42"),
        (r"\boxed{ 7 }", "7"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\text{\$}1{,}000}", r"\text{\$}1{,}000"),
        # JSON-escaped backslashes still mark a box.
        (r"\\boxed{5}", "5"),
        ("#### 18", "18"),
        ("#### -3.5", "-3.5"),
        ("#### 1,000", "1,000"),
        ("The answer is 18.", None),
        ("", None),
        (r"\boxed{}", None),
        # Truncated box: nothing balanced to take.
        (r"\boxed{12", None),
    ],
)
def test_extract_strict(text, expected):
    assert extract_answer(text) == expected


def test_last_boxed_wins():
    text = r"First \boxed{3}, then \boxed{\frac{4}{5}}, finally \boxed{6}. #### 9"
    assert extract_answer(text) == "6"


def test_truncated_last_box_falls_back_to_earlier_balanced_box():
    assert extract_answer(r"\boxed{3} and then \boxed{4") == "3"


def test_first_hash_answer_wins():
    assert extract_answer("#### 5\nwait, no\n#### 7") == "5"


def test_boxed_beats_hash():
    assert extract_answer(r"#### 5 ... \boxed{7}") == "7"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She makes $18 a day... so 9 * 2 = 18.", "18."),
        ("I have 3 apples and then 1,000 more", "1,000"),
        ("The total is \u22125.", "-5."),  # A Unicode minus keeps its sign.
        ("It costs 2\u00bd dollars", "2\u00bd"),
        ("It costs 3 \u00bd dollars", "3 \u00bd"),
        ("#### 3\u00b2", "3\u00b2"),
        ("owes -5 now", "-5"),
        ("It costs $25", "$25"),
        ("#### 4 and then 8", "4"),
        (r"\boxed{2} and then 8", "2"),
        ("no digits at all...", None),
    ],
)
def test_extract_flexible(text, expected):
    assert extract_answer(text, "flexible") == expected


def test_strict_does_not_fall_back_to_last_number():
    assert extract_answer("The answer is 18.", "strict") is None


def test_unknown_method():
    with pytest.raises(ValueError, match="strict.*flexible"):
        extract_answer("#### 1", "lenient")


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("18", "18"),
        ("18.00", "18"),
        ("18.", "18"),
        ("+18", "18"),
        ("-5", "-5"),
        ("- 5", "-5"),
        ("\u22125", "-5"),
        ("-0", "0"),
        ("0.50", "0.5"),
        (".25", "0.25"),
        ("1,000", "1000"),
        ("1,450,000", "1450000"),
        ("$1,000.00", "1000"),
        (r"\$18", "18"),
        (r"\\$18", "18"),
        ("$18.", "18"),
        (r"1\,000", "1000"),
        ("1{,}000", "1000"),
        (r"1\!000", "1000"),
        ("50%", "50"),
        (r"50\%", "50"),
        ("18 dollars", "18"),
        (r"18 \text{ dollars}", "18"),
        (r"\text{18}", "18"),
        (r"\textbf{18 cm}", "18"),
        (r"\textit{18}", "18"),
        (r"\emph{18} dollars", "18"),
        (r"\displaystyle 18", "18"),
        (r"\displaystyle\frac{3}{4}", "0.75"),
        (r"\displaystyle18", "18"),
        ("  18  ", "18"),
        (r"\text{\$}1{,}000", "1000"),
        (r"\frac{1}{2}", "0.5"),
        (r"\dfrac{3}{4}", "0.75"),
        (r"\frac12", "0.5"),
        (r"-\frac{1}{4}", "-0.25"),
        (r"\frac{10}{2}", "5"),
        (r"\frac{1}{3}", "1/3"),
        ("1/2", "0.5"),
        ("6/3", "2"),
        ("2/6", "1/3"),
        ("123456789012345678901234567890.5", "123456789012345678901234567890.5"),
        ("{18}", "18"),
        ("18,", "18"),  # flexible-extract keeps a comma that ends a clause
        ("1,000.50", "1000.5"),
        (r"\frac{-1}{4}", "-0.25"),
        ("18 km/h", "18"),
        ("2.5 km per hour", "2.5"),
        ("18~dollars", "18"),
        # Scale words scale; other unit words do not.
        ("1.5 million", "1500000"),
        ("18 thousand dollars", "18000"),
        ("18k", "18000"),
        (r"\$18\text{k}", "18000"),
        ("18 ks", "18"),
        ("18 m\u00b2", "18"),  # A power in the units is the units'.
        # Number words within units, hyphenated or after another word.
        ("24 two-liter bottles", "24"),
        ("8 half-dollars", "8"),
        ("18 one-way tickets", "18"),
        ("18 dollars per hundred", "18"),
        ("18 each one", "18"),
        ("18 a day", "18"),
        # Vulgar fractions, alone or after a whole number.
        ("2\u00bd", "2.5"),
        ("-2 \u00bd dollars", "-2.5"),
        ("\u2153", "1/3"),
        ("2\u2154 cups", "8/3"),
    ],
)
def test_canonical_number(raw, expected):
    assert canonical_number(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "abc",
        "...",
        "1.2.3",
        "5 apples and 3 pears",
        r"1\frac{1}{2}",  # Mixed number: not read as 11/2.
        "1/0",
        r"2 \cdot 3",
        # Not the number they contain: a word or command before it, two
        # numbers run together, a comma that groups no thousands.
        r"\sqrt{18}",
        r"\approx 18",
        "not 18",
        "x = 18",
        "2(3)",
        "2,3",
        "1,0000",
        "18 " + "a" * 40 + "1",  # (and no catastrophic backtracking)
        # A power, or a second amount in words after the first.
        "3\u00b2",
        "10\u00b3",
        "5 and a half",
        "2 thousand five hundred",
        "1 hundred and five",
        "5 one",
        "5 hundred thousand",
        "18 dollars and fifty cents",
        "1 hundred and twenty-five",
        "5 and one-half",
        "2 thousand five-hundred",
        "1" * 5000,  # (too long for Python to print)
    ],
)
def test_canonical_number_rejects_non_numbers(raw):
    assert canonical_number(raw) is None


@pytest.mark.parametrize(
    "answer_text, expected",
    [
        ("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", "18"),
        ("Total: 2,125 dollars\n#### 2,125", "2125"),
        ("#### 1\n#### -7 ", "-7"),
        ("42", "42"),
        (" 1,000 ", "1000"),
    ],
)
def test_gold_answer(answer_text, expected):
    assert gold_answer(answer_text) == expected


GOLD_TEXT = "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"


@pytest.mark.parametrize("gold", [GOLD_TEXT, "18", " 18 "])
@pytest.mark.parametrize(
    "response",
    [
        r"The answer is \boxed{18}.",
        r"\boxed{\$18.00}",
        r"\boxed{18 \text{ dollars}}",
        r"\boxed{\frac{36}{2}}",
        "#### 18",
        "#### 18.00",
    ],
)
def test_is_correct(response, gold):
    assert is_correct(response, gold)


@pytest.mark.parametrize("gold", [GOLD_TEXT, "18"])
@pytest.mark.parametrize(
    "response",
    [
        r"\boxed{17}",
        r"\boxed{-18}",
        r"\boxed{1.8}",
        r"\boxed{18} is wrong, it is \boxed{19}",
        "The answer is 18.",  # Strict: no box and no `####`.
        "",
    ],
)
def test_is_not_correct(response, gold):
    assert not is_correct(response, gold)


@pytest.mark.parametrize(
    "response, method, gold, correct",
    [
        ("#### \u22125", "strict", "-5", True),
        ("#### \u22125", "flexible", "5", False),
        ("#### 2\u00bd", "strict", "2", False),
        ("#### 2\u00bd", "strict", "2.5", True),
        ("#### 3\u00b2", "strict", "3", False),
        ("So she owes \u22125.", "flexible", "5", False),
        ("The cost is 2\u00bd dollars.", "flexible", "2.5", True),
        ("The cost is 2\u00bd dollars.", "flexible", "2", False),
        (r"\boxed{2\u00bd}", "strict", "2", False),
        (r"\boxed{5 and a half}", "strict", "5", False),
    ],
)
def test_unicode_minus_fractions_and_amount_words(response, method, gold, correct):
    """A sign, a fraction or a second amount never dropped: each of these
    would score a wrong answer right."""
    assert is_correct(response, gold, method) == correct


def test_is_correct_with_commas_in_gold():
    assert is_correct(r"\boxed{1,450,000}", "...\n#### 1,450,000")
    assert is_correct("#### 1450000", "1,450,000")


def test_is_correct_flexible():
    assert is_correct("The answer is 18.", GOLD_TEXT, "flexible")
    assert not is_correct("The answer is 18, not 17.", GOLD_TEXT, "flexible")


@pytest.mark.parametrize("response", [r"\boxed{2,3}", r"\boxed{1,2345}"])
def test_commas_that_group_no_thousands_match_no_number(response):
    gold = response[7:-1].replace(",", "")
    assert not is_correct(response, gold)


def test_is_correct_falls_back_to_text_comparison():
    assert is_correct(r"\boxed{Yes}", "yes.")
    assert is_correct(r"\boxed{\text{B}}", "b")
    assert not is_correct(r"\boxed{No}", "yes")
    assert not is_correct(r"\boxed{eighteen}", "18")
