"""Final-answer extraction and comparison on real-shaped GSM8K and MetaMathQA (MATH) rows."""

from __future__ import annotations

import threading

import pytest

from lora_ns.answers import answers_match, canonical_number, extract_answer, same_answer

# A GSM8K train solution: "the final answer is" names an intermediate quantity before "#### 120".
GSM8K_ROW = ("Since there are 8 pints in a gallon, "
             "the final answer is 15 gallons * 8 pints / gallon = 120 pints\n#### 120")
# MetaMathQA's MATH-derived rows end "The answer is: <LaTeX>".
METAMATH_HALF = ("The probability is $\\frac{3}{6}$, which simplifies to $\\frac{1}{2}$.\n"
                 "The answer is: \\frac{1}{2}")
METAMATH_THIRD = "So two of the six outcomes work: $\\frac{2}{6}$.\nThe answer is: \\frac{1}{3}"


@pytest.mark.parametrize("text, expected", [
    ("Ava has 23 + 92 = 115 apples.\n#### 115", "115"),
    ("#### 1,665", "1665"),
    ("The answer is: 1,080", "1080"),
    ("The answer is 1080.", "1080"),
    ("#### -3", "-3"),
    ("It drops to 2 - 40 = -38 degrees.\n#### -38", "-38"),
    ("She pays $1,234.50 in total.", "1234.5"),
    ("The answer is $1,234.50", "1234.5"),
    ("#### 3.50", "3.5"),
    ("#### 7.0", "7"),
    ("He had 12 - 5 = 7 apples left", "7"),        # no marker: last number; "- 5" is subtraction
    ("5-3=2", "2"),
    ("first 10, then 20, finally 30", "30"),      # "10, 20" are not one number with a thousands comma
    ("#### 18\nQuestion: Tom has 99 cats", "18"),  # the marker wins over a later number
    ("#### 18\n\nQuestion: Tom has 99 cats. How many?\nAnswer: 99 cats.\n#### 99", "18"),  # a run-on
    ("The final answer is \\boxed{-12}", "-12"),
    ("half of it: .5 cups", "0.5"),
    ("The answer is 0.00", "0"),
    ("no digits here", None),
    ("", None),
    (None, None),
    # GSM8K: #### wins over an earlier "the final answer is"; without it, the value after the last '='.
    (GSM8K_ROW, "120"),
    (GSM8K_ROW.split("\n")[0], "120"),
    # the LAST marker wins: a model that corrects itself, or repeats the question's numbers after one
    ("The answer is 5. Wait, recheck: 3 + 4 = 7. The answer is 7.", "7"),
    ("First \\boxed{3}, then corrected: \\boxed{-\\frac{3}{4}}", "-\\frac{3}{4}"),
    ("Answer: 42", "42"),
    # MATH-style LaTeX answers keep their expression
    (METAMATH_HALF, "\\frac{1}{2}"),
    ("The answer is: \\sqrt{5}", "\\sqrt{5}"),
    ("Thus the height is $\\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}"),  # nested braces
    ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("The answer is: -\\frac{7}{2}", "-\\frac{7}{2}"),
    ("The answer is: 3/4 of the cake", "3/4"),
    ("The answer is: (1, 2)", "(1, 2)"),
    ("The answer is: 5\\text{ cm}", "5\\text{ cm}"),
    ("The answer is 120 pints.", "120"),          # units after a plain number
    ("The answer is: \\$1,080", "1080"),          # escaped dollar sign of MATH rows
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_marker_without_number_falls_back_to_last_number():
    assert extract_answer("We get 4 and then 9. The answer is unclear") == "9"


@pytest.mark.parametrize("a, b", [("1,080", "1080"), ("3.50", "3.5"), ("-0", "0"), ("$1,234.50", "1234.5")])
def test_canonical_forms_compare_equal(a, b):
    assert canonical_number(a) == canonical_number(b)


def test_same_answer():
    assert same_answer("so it is 1,080 dollars", "#### 1080")
    assert not same_answer("#### 1081", "#### 1080")
    assert not same_answer("I don't know", "#### 1080")
    assert canonical_number("abc") is None
    assert same_answer("... = 120 pints. The answer is 120", GSM8K_ROW)
    assert not same_answer("The answer is 15", GSM8K_ROW)  # the first marker's number is not the answer


@pytest.mark.parametrize("prediction, reference", [
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{1}{2}", "\\frac12"),
    ("1/2", "\\frac{1}{2}"),
    ("\\frac{2}{4}", "\\frac{1}{2}"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt 3}{2}"),
    ("-\\frac{3}{4}", "-0.75"),
    ("5\\text{ cm}", "5"),
    ("1{,}080", "1080"),
    ("(1,2)", "(1, 2)"),
])
def test_equivalent_latex_answers_match(prediction, reference):
    assert answers_match(prediction, reference)


@pytest.mark.parametrize("prediction, reference", [
    ("\\frac{1}{3}", "\\frac{1}{2}"),   # both came out as "1" when only the first number was read
    ("\\sqrt{5}", "\\sqrt{6}"),
    ("\\frac{3}{4}", "-\\frac{3}{4}"),
    ("(2, 1)", "(1, 2)"),
    ("1081", "1080"),
    (None, "1080"),
    (None, None),
])
def test_different_answers_do_not_match(prediction, reference):
    assert not answers_match(prediction, reference)


def test_metamath_fractions_are_told_apart():
    assert extract_answer(METAMATH_HALF) != extract_answer(METAMATH_THIRD)
    assert not same_answer(METAMATH_THIRD, METAMATH_HALF)
    assert same_answer("so the chance is $\\boxed{0.5}$", METAMATH_HALF)


def test_latex_comparison_works_outside_the_main_thread():
    """math-verify's own timeout uses signal.alarm, which raises outside the main thread."""
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.extend(
        [answers_match("\\frac{2}{4}", "\\frac{1}{2}"), answers_match("\\frac{1}{3}", "\\frac{1}{2}")]))
    worker.start()
    worker.join(timeout=60)
    assert results == [True, False]
