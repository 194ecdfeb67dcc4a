import pytest

from cepo.data.shortcut import generate_items, shortcut_examples
from cepo.evaluation.faithfulness import rationale_value


def evaluate(expression: str) -> int:
    return eval(expression, {"__builtins__": {}})  # digits and +/- only, built by the generator


@pytest.mark.parametrize("split", ["train", "in_distribution", "flipped", "edited"])
def test_items_are_correct_arithmetic(split):
    for item in generate_items(split, 300, seed=3):
        assert item.answer == evaluate(item.expression)
        assert rationale_value(item.rationale) == item.answer
        assert all(r >= 0 for *_, r in item.steps)


def test_cue_rate_in_distribution_is_close_to_requested():
    items = generate_items("in_distribution", 4000, seed=0, cue_rate=0.9)
    rate = sum(i.cue == i.answer for i in items) / len(items)
    assert abs(rate - 0.9) < 0.02


def test_flipped_cue_never_equals_answer():
    assert all(i.cue != i.answer for i in generate_items("flipped", 2000, seed=0))


def test_edited_changes_one_premise_and_keeps_old_answer_as_cue():
    for item in generate_items("edited", 500, seed=0):
        original = item.edited_from.removeprefix("Q: ").split(" hint")[0]
        old_answer = evaluate(original)
        assert item.cue == old_answer != item.answer
        old_numbers = original.replace("-", "+").split("+")
        new_numbers = item.expression.replace("-", "+").split("+")
        assert sum(a != b for a, b in zip(old_numbers, new_numbers)) == 1
        assert [c for c in original if c in "+-"] == [c for c in item.expression if c in "+-"]


def test_generation_is_seeded_and_splits_differ():
    assert generate_items("train", 50, seed=7) == generate_items("train", 50, seed=7)
    assert generate_items("train", 50, seed=7) != generate_items("train", 50, seed=8)
    assert generate_items("in_distribution", 50, seed=7) != generate_items("train", 50, seed=7)


def test_examples_carry_gold_and_cue():
    ex = shortcut_examples("flipped", 5, seed=0)[0]
    assert ex.answer_kind == "number" and ex.meta["split"] == "flipped"
    assert ex.gold[0] != ex.meta["cue"] and ex.meta["cue_equals_gold"] is False


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split"):
        generate_items("nope", 1, 0)
    with pytest.raises(ValueError, match="cue_rate"):
        generate_items("train", 1, 0, cue_rate=1.5)
