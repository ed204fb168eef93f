"""Final-answer extraction: markers, commas, negatives, decimals, currency, no marker."""

from __future__ import annotations

import pytest

from lora_ns.answers import canonical_number, extract_answer, same_answer


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
    ("The final answer is \\boxed{-12}", "-12"),
    ("half of it: .5 cups", "0.5"),
    ("The answer is 0.00", "0"),
    ("no digits here", None),
    ("", None),
    (None, None),
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
