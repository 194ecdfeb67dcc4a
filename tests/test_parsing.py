import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cepo.answers.parsing import (
    AnswerParser,
    ParsedCompletion,
    answer_instruction,
    last_boxed,
    parse_completion,
)


@pytest.fixture(scope="module")
def parser():
    return AnswerParser()


def test_answer_tag(parser):
    parsed = parser("First 3+4=7.\n<answer> 7 </answer>")
    assert parsed == ParsedCompletion("First 3+4=7.", "7", "answer")
    assert parsed.marker_found


def test_finalanswer_tag_and_case_insensitive_tags(parser):
    assert parser("So it is 5. <FinalAnswer>5</FinalAnswer>") == ParsedCompletion("So it is 5.", "5", "finalanswer")
    assert parser("x < answer >9</ answer >").answer == "9"


def test_duplicated_tags_last_wins(parser):
    parsed = parser("try <answer>1</answer> wait, recheck <answer>2</answer> done")
    assert parsed.answer == "2"
    assert parsed.rationale == "try <answer>1</answer> wait, recheck"


def test_opening_tag_without_closing_takes_rest(parser):
    parsed = parser("reasoning here <answer> 42 because")
    assert parsed == ParsedCompletion("reasoning here", "42 because", "answer")


def test_nested_tags_do_not_crash(parser):
    parsed = parser("<answer><answer>5</answer></answer>")
    assert parsed.answer == "5"
    assert parsed.marker == "answer"
    assert parser("</answer> only a closing tag").marker is None


def test_marker_order_decides_kind():
    text = "<finalanswer>A</finalanswer> and \\boxed{B} and <answer>C</answer>"
    assert AnswerParser()(text).answer == "C"
    assert AnswerParser(("finalanswer", "answer"))(text).answer == "A"
    assert AnswerParser(("boxed", "answer"))(text).answer == "B"


def test_boxed_with_nested_braces(parser):
    parsed = parser("Thus $x = \\boxed{\\frac{1}{2}}$.")
    assert parsed == ParsedCompletion("Thus $x =", "\\frac{1}{2}", "boxed")
    assert parser("\\boxed{\\text{a}\\{b\\}}").answer == "\\text{a}\\{b\\}"
    assert parser("so \\fbox{7}").answer == "7"
    assert parser("\\boxed{1} then \\boxed{2}").answer == "2"


def test_unclosed_boxed_takes_rest(parser):
    assert parser("so \\boxed{\\frac{1}{2").answer == "\\frac{1}{2"
    assert last_boxed("no box") is None
    assert last_boxed("a \\boxed{{x}} b") == "{x}"


def test_gsm8k_line(parser):
    text = "#### Step 1\nShe makes 9 * 2 = 18.\n#### 18\n"
    parsed = parser(text)
    assert parsed == ParsedCompletion("#### Step 1\nShe makes 9 * 2 = 18.", "18", "gsm8k")
    assert parser("#### $1,234").answer == "$1,234"


def test_markdown_heading_is_not_a_gsm8k_answer(parser):
    parsed = parser("#### Final Answer\nThe total is 12.")
    assert parsed.marker is None
    assert parsed.answer == "The total is 12."


def test_custom_tag():
    parser = AnswerParser(("solution",))
    assert parser("work <solution>x=2</solution>") == ParsedCompletion("work", "x=2", "solution")
    with pytest.raises(ValueError, match="tag name"):
        AnswerParser(("not a tag",))


def test_fallback_last_sentence_and_line(parser):
    parsed = parser("We add 3 and 4. So the sum is 7. The answer is 7.")
    assert parsed == ParsedCompletion("We add 3 and 4. So the sum is 7.", "The answer is 7.", None)
    assert not parsed.marker_found
    parsed = parser("Line one.\n\nThe result: 3.5\n\n  ")
    assert parsed == ParsedCompletion("Line one.", "The result: 3.5", None)
    assert parser("just 12") == ParsedCompletion("", "just 12", None)


def test_empty_text(parser):
    assert parser("") == ParsedCompletion("", "", None)
    assert parser("  \n ") == ParsedCompletion("", "", None)
    assert parser("<answer></answer>") == ParsedCompletion("", "", "answer")


def test_parse_completion_matches_parser():
    assert parse_completion("a <answer>b</answer>", markers=("answer",)) == ParsedCompletion("a", "b", "answer")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab <>/{}\\#\n.answerboxd1")), max_size=60))
def test_parser_never_crashes_and_answer_is_a_substring(text):
    parsed = AnswerParser()(text)
    assert parsed.answer in text
    assert parsed.rationale in text
    if parsed.marker is None and text.strip():
        # the fallback splits the text: nothing but whitespace is lost
        assert parsed.answer
        assert text.strip().endswith(parsed.answer)


def test_answer_instruction_names_the_marker():
    assert "<answer>...</answer>" in answer_instruction("answer")
    assert "<finalanswer>...</finalanswer>" in answer_instruction("finalanswer")
    assert "\\boxed{}" in answer_instruction("boxed")
    assert "####" in answer_instruction("gsm8k")
    assert "<sol>...</sol>" in answer_instruction("sol")
    # the instruction and the parser agree: text written as instructed is parsed back
    for marker, written in (("answer", "<answer>7</answer>"), ("boxed", "\\boxed{7}"), ("gsm8k", "#### 7")):
        assert AnswerParser((marker,))("work\n" + written).answer == "7"
