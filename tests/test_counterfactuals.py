import random
import re
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from cepo.coherence.counterfactuals import (
    COUNTERFACTUALS,
    NumberReplace,
    WordDropout,
    WordShuffle,
    draw_counterfactuals,
)

texts = st.text(alphabet=st.sampled_from(list("abc xyz12\n\t.")), max_size=60)


def words(text):
    return re.findall(r"\S+", text)


def whitespace_pattern(text):
    """The text with every non-whitespace run replaced by a placeholder."""
    return re.sub(r"\S+", "W", text)


@settings(max_examples=200, deadline=None)
@given(texts, st.integers(0, 10**6))
def test_shuffle_keeps_words_and_whitespace_pattern(text, seed):
    out = WordShuffle()(text, random.Random(seed))
    assert Counter(words(out)) == Counter(words(text))
    assert whitespace_pattern(out) == whitespace_pattern(text)
    assert len(out) == len(text)


@settings(max_examples=100, deadline=None)
@given(texts, st.integers(0, 10**6))
def test_shuffle_is_reproducible_under_a_seed(text, seed):
    assert WordShuffle()(text, random.Random(seed)) == WordShuffle()(text, random.Random(seed))


def test_shuffle_leaves_one_word_texts_unchanged_and_permutes_longer_ones():
    rng = random.Random(0)
    for text in ["", "   ", "word", "  word \n", "a+b=c;"]:
        assert WordShuffle()(text, rng) == text
    text = "one two three four five six seven eight"
    draws = {WordShuffle()(text, random.Random(s)) for s in range(10)}
    assert len(draws) > 5


def test_number_replace_changes_every_number_and_keeps_the_rest():
    text = "Q: 7+15-309 hint: 07, x=3.14\n"
    for seed in range(50):
        out = NumberReplace()(text, random.Random(seed))
        assert re.sub(r"\d", "#", out) == re.sub(r"\d", "#", text)
        old, new = re.findall(r"\d+", text), re.findall(r"\d+", out)
        assert all(a != b and len(a) == len(b) for a, b in zip(old, new))
        assert all(b[0] != "0" for a, b in zip(old, new) if len(a) > 1 and a[0] != "0")
    assert NumberReplace()("no digits here", random.Random(0)) == "no digits here"


@settings(max_examples=100, deadline=None)
@given(texts, st.integers(0, 10**6))
def test_word_dropout_keeps_an_ordered_subsequence_of_words(text, seed):
    out = WordDropout(p=0.5)(text, random.Random(seed))
    original, kept = words(text), words(out)
    if len(original) <= 1:
        assert out == text
        return
    assert 1 <= len(kept) <= len(original)
    it = iter(original)
    assert all(any(w == o for o in it) for w in kept)  # kept is a subsequence of original


def test_draw_counterfactuals_is_seeded_and_per_text():
    texts_ = ["a b c d e f", "g h i j k l", "m n o p q r"]
    first = draw_counterfactuals(texts_, WordShuffle(), 3, seed="0:5")
    assert first == draw_counterfactuals(texts_, WordShuffle(), 3, seed="0:5")
    assert [len(row) for row in first] == [3, 3, 3]
    assert first != draw_counterfactuals(texts_, WordShuffle(), 3, seed="0:6")
    # A text's draws do not depend on the other texts.
    other = draw_counterfactuals(["zz yy xx", texts_[1]], WordShuffle(), 3, seed="0:5")
    assert other[1] == first[1]
    assert draw_counterfactuals(texts_, WordShuffle(), 0) == [[], [], []]
    assert set(COUNTERFACTUALS) == {"word_shuffle", "number_replace", "word_dropout", "conclusion_edit"}


def test_word_shuffle_never_returns_the_original_order_when_another_exists():
    import random as _random

    from cepo.coherence.counterfactuals import WordShuffle

    shuffle = WordShuffle()
    rng = _random.Random(0)
    assert all(shuffle("7+5=12; 12-3=9;", rng) == "12-3=9; 7+5=12;" for _ in range(50))
    assert shuffle("same same", rng) == "same same"  # one distinct word: nothing to permute


def test_draws_follow_the_text_or_key_not_the_position():
    text = "one two three four five six"
    rows = draw_counterfactuals([text, "x y z", text], WordShuffle(), 3, seed="0:1")
    assert rows[0] == rows[2]  # the same text at another row draws the same shuffles
    assert draw_counterfactuals([text], WordShuffle(), 3, seed="0:1")[0] == rows[0]
    keyed = draw_counterfactuals([text, text], WordShuffle(), 3, seed="0:1", keys=["rollout a", "rollout b"])
    assert keyed[0] != keyed[1]  # different keys (e.g. different completions) draw independently
    assert keyed[0] == draw_counterfactuals([text], WordShuffle(), 3, seed="0:1", keys=["rollout a"])[0]
