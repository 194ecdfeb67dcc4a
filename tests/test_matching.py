import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cepo.answers.matching import (
    KINDS,
    answers_match,
    infer_kind,
    normalize_math,
    normalize_number,
    normalize_text,
    normalize_yes_no,
)

OPTIONS = ["the cat sat", "a dog barked", "birds sang", "fish swam"]


@pytest.mark.parametrize(
    "text, value",
    [
        ("1,234", 1234.0),
        ("1,234,567.5", 1234567.5),
        ("$18", 18.0),
        ("\\$18.50", 18.5),
        ("18 dollars", 18.0),
        ("18 dollars.", 18.0),
        ("50%", 50.0),
        ("-5", -5.0),
        ("\u22127", -7.0),
        ("0.25", 0.25),
        (".5", 0.5),
        ("3/4", 0.75),
        ("-3/4", -0.75),
        ("\\frac{3}{4}", 0.75),
        ("\\dfrac{3}{4}", 0.75),
        ("\\dfrac34", 0.75),
        ("-\\frac12", -0.5),
        ("\\boxed{\\frac{1}{2}}", 0.5),
        ("$12$", 12.0),
        ("x = 5", 5.0),
        ("The answer is 18.", 18.0),
        ("**18**", 18.0),
        ("5 million", 5e6),
        ("120^\\circ", 120.0),
        ("50,\\!625", 50625.0),
    ],
)
def test_normalize_number(text, value):
    assert normalize_number(text) == pytest.approx(value)


@pytest.mark.parametrize(
    "text",
    ["3 or 4", "x+1", "3x", "2\\pi", "five", "", "1 234", "3/0", "1,23", "18 and 19", "(5)", "abc", "5 is wrong"],
)
def test_normalize_number_rejects_non_numbers(text):
    assert normalize_number(text) is None


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"),
        ("$\\frac12$", "\\frac{1}{2}"),
        ("\\tfrac{1}2", "\\frac{1}{2}"),
        ("\\left( 3, 4 \\right)", "(3,4)"),
        ("120^\\circ", "120"),
        ("120^{\\circ}", "120"),
        ("5\\text{ cm}", "5"),
        ("\\text{Devon}", "Devon"),
        ("x = \\sqrt3", "\\sqrt{3}"),
        ("10.", "10"),
        ("50,\\!625", "50625"),
        ("\\$115,000", "115000"),
        ("x \\leq 3", "x\\le3"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
    ],
)
def test_normalize_math(text, canonical):
    assert normalize_math(text) == canonical


def test_normalize_text_squad_style():
    assert normalize_text("The  Clint Eastwood!") == "clint eastwood"
    assert normalize_text("An apple, a day.") == "apple day"
    assert normalize_text("\u201cQuoted\u201d") == "quoted"


@pytest.mark.parametrize("text", ["Yes.", "yes", "**Yes**", "YES, because it is", "(yes)", "Yes\nsince"])
def test_yes_variants(text):
    assert normalize_yes_no(text) == "yes"
    assert answers_match(text, "Yes", "yes_no")
    assert not answers_match(text, "No", "yes_no")


@pytest.mark.parametrize("text", ["no, yes", "Yesterday", "The answer is yes", "Ambiguous", "maybe yes"])
def test_only_a_leading_yes_counts(text):
    assert not answers_match(text, "yes", "yes_no")
    assert not answers_match(text, "yes")


def test_number_rule():
    assert answers_match("18", "18.0", "number")
    assert answers_match("$18", "18")
    assert answers_match("18 dollars", "18")
    assert answers_match("1,234", "1234")
    assert answers_match("\\frac{3}{4}", "0.75")
    assert answers_match("-\\frac12", "-0.5")
    assert not answers_match("18", "180")
    assert not answers_match("180", "18")
    assert not answers_match("-18", "18")
    assert not answers_match("18 or 19", "18")
    assert not answers_match("1000001", "1000000", "number")  # relative tolerance is 1e-6, not looser


def test_math_rule():
    assert answers_match("\\boxed{\\dfrac{1}{2}}", "\\frac12", "math")
    assert answers_match("0.5", "\\frac{1}{2}", "math")
    assert answers_match("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", "math")
    assert answers_match("-1, 1, -3i", "1,-1,-3i", "math")
    assert answers_match("27^\\circ", "27", "math")
    assert not answers_match("(-4,-5)", "(-5, -4)", "math")
    assert not answers_match("\\frac{1}{3}", "\\frac{1}{2}", "math")
    assert not answers_match("2\\sqrt{3}", "\\sqrt{3}", "math")
    assert not answers_match("1,2", "1,2,3", "math")


def test_text_rule_is_exact_after_normalisation():
    assert answers_match("the Clint Eastwood.", "Clint Eastwood")
    assert not answers_match("Clint", "Clint Eastwood")
    assert not answers_match("Clint Eastwood Jr", "Clint Eastwood")
    assert answers_match("three", ["3", "three"])


def test_auto_infers_rule_from_gold():
    assert infer_kind("18") == "number"
    assert infer_kind("Yes") == "yes_no"
    assert infer_kind("2 \\pi + 4") == "math"
    assert infer_kind("Clint Eastwood") == "text"


@pytest.mark.parametrize(
    "pred", ["B", "(B)", "B.", "B) a dog barked", "b", "Option B", "[B]", "a dog barked", "**B**"]
)
def test_choice_prediction_forms(pred):
    assert answers_match(pred, "B", "choice", OPTIONS)
    assert answers_match(pred, "a dog barked", "choice", OPTIONS)
    assert answers_match(pred, '1, "a dog barked"', "choice", OPTIONS)
    assert not answers_match(pred, "C", "choice", OPTIONS)


def test_choice_letter_is_never_found_inside_a_word():
    assert not answers_match("Because the dog barked", "B", "choice", OPTIONS)
    assert not answers_match("Because the dog barked", "B", "choice")
    assert not answers_match("Birds sang", "B", "choice", OPTIONS)
    assert not answers_match("A dog barked loudly", "B", "choice", OPTIONS)


def test_choice_index_forms():
    assert answers_match("1", '1, "a dog barked"', "choice", OPTIONS)
    assert answers_match('1, "a dog barked"', "B", "choice", OPTIONS)
    assert not answers_match("2", '1, "a dog barked"', "choice", OPTIONS)
    # an index prediction is only read as an index when the gold is given by index
    assert not answers_match("1", "a dog barked", "choice", OPTIONS)
    # without options, only like forms compare
    assert answers_match("(B)", "B", "choice")
    assert not answers_match("a dog barked", "B", "choice")


def test_unparseable_or_empty_gold_never_matches():
    for kind in KINDS:
        assert not answers_match("", "", kind)
        assert not answers_match("18", "", kind)
        assert not answers_match("anything", [], kind)
        assert not answers_match("   ", "   ", kind)
    assert not answers_match("18", "eighteen-ish", "number")
    assert not answers_match("yes", "Ambiguous", "yes_no")
    assert not answers_match("E", "E", "choice", OPTIONS)  # option E does not exist
    assert not answers_match("!!!", "...", "text")


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown answer kind"):
        answers_match("1", "1", "fuzzy")


@settings(max_examples=300, deadline=None)
@given(st.integers(-10**9, 10**9), st.integers(-10**9, 10**9))
def test_a_wrong_integer_is_never_right_under_any_rule(a, b):
    if a == b:
        for kind in ("auto", "number", "math", "text"):
            assert answers_match(str(a), str(b), kind)
        return
    for kind in KINDS:
        assert not answers_match(str(a), str(b), kind)
        assert not answers_match(str(a), str(b), kind, OPTIONS)
        assert not answers_match(f"{a:,}", str(b), kind)


def leading_word(text: str) -> str:
    """The first word of ``text``, found without regular expressions: skip characters that are neither
    letters nor digits (punctuation, markup, spaces, underscores), then take letters, digits and
    underscores up to the next other character."""
    start = 0
    while start < len(text) and not text[start].isalnum():
        start += 1
    end = start
    while end < len(text) and (text[end].isalnum() or text[end] == "_"):
        end += 1
    return text[start:end]


# Prefixes built mostly from the characters that decide the rule (markup, underscores, yes/no letters,
# other letters and digits), plus arbitrary text.
PREFIX = st.one_of(st.text(st.sampled_from(list(" _*(.,!?\n\tyesnoYESNOabx1é")), max_size=8), st.text(max_size=20))


@settings(max_examples=300, deadline=None)
@given(PREFIX, st.sampled_from(["yes", "no"]))
def test_yes_no_needs_the_leading_token(prefix, gold):
    # Only the first word decides: "** No, yes" is no; "yesterday yes" and "_x yes" are neither.
    pred = f"{prefix} {gold}"
    expected = leading_word(pred).casefold() == gold
    assert answers_match(pred, gold, "yes_no") is expected, (pred, leading_word(pred))


@pytest.mark.parametrize("pred, gold, expected", [
    ("_ yes", "yes", True), ("__yes__", "yes", False), ("**no** yes", "no", True), ("yes_no", "yes", False),
    ("NO yes", "no", True), ("nob no", "no", False), ("1 yes", "yes", False), ("é yes", "yes", False),
])
def test_yes_no_leading_word_by_hand(pred, gold, expected):
    assert leading_word(pred).casefold() == gold if expected else leading_word(pred).casefold() != gold
    assert answers_match(pred, gold, "yes_no") is expected


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30), st.text(max_size=30), st.sampled_from(KINDS))
def test_answers_match_never_raises(pred, gold, kind):
    assert answers_match(pred, gold, kind, OPTIONS) in (True, False)
    assert answers_match(pred, gold, kind) in (True, False)
