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


# ---------------------------------------------------------------- the hard variant (second testbed)


@pytest.mark.parametrize("split", ["train", "in_distribution", "flipped", "edited"])
def test_hard_variant_has_two_digit_operands_and_correct_arithmetic(split):
    items = generate_items(split, 300, seed=3, variant="hard")
    for item in items:
        assert item.answer == evaluate(item.expression)
        assert rationale_value(item.rationale) == item.answer
        assert all(r >= 0 for *_, r in item.steps)
        assert len(item.ops) == 2 and all(10 <= v <= 99 for v in item.operands)
    # additions that carry are common (they are what the shipped hard policy gets wrong)
    share = sum(any(i.carry_steps) for i in items) / len(items)
    assert 0.3 < share < 0.6


def test_hard_variant_cue_rates_per_split():
    items = generate_items("in_distribution", 4000, seed=0, variant="hard")
    assert abs(sum(i.cue == i.answer for i in items) / len(items) - 0.9) < 0.02
    assert all(i.cue != i.answer for i in generate_items("flipped", 2000, seed=0, variant="hard"))
    for item in generate_items("edited", 300, seed=0, variant="hard"):
        original = item.edited_from.removeprefix("Q: ").split(" hint")[0]
        assert item.cue == evaluate(original) != item.answer
        assert all(10 <= v <= 99 for v in item.operands)


def test_hard_variant_is_seeded_and_differs_from_easy():
    assert generate_items("train", 50, seed=7, variant="hard") == generate_items("train", 50, seed=7, variant="hard")
    assert generate_items("train", 50, seed=7, variant="hard") != generate_items("train", 50, seed=8, variant="hard")
    assert generate_items("train", 50, seed=7, variant="hard") != generate_items("train", 50, seed=7)
    # an explicit range overrides the variant's
    assert all(v <= 20 for i in generate_items("train", 50, 0, variant="hard", max_operand=20) for v in i.operands)


def test_easy_default_is_unchanged_by_the_variant_option():
    # the first testbed's items, fixed before the option existed (seed 0, first training item)
    item = generate_items("train", 1, seed=0)[0]
    assert generate_items("train", 20, seed=0) == generate_items("train", 20, seed=0, variant="easy")
    assert all(1 <= v <= 9 for v in item.operands)


def test_dropped_carry_rationale_by_hand():
    from cepo.data.shortcut import ArithmeticItem

    item = ArithmeticItem((47, 38, 12), ("+", "-"), cue=73)
    assert item.carry_steps == [True, False]
    assert item.carry_dropped_rationale([False, False]) == (item.rationale, 73)
    # 7+8 carries: the dropped carry writes 75, and the next step continues from it
    assert item.carry_dropped_rationale([True, True]) == ("47+38=75; 75-12=63;", 63)
    item = ArithmeticItem((41, 38, 55), ("+", "+"), cue=134)
    assert item.carry_steps == [False, True]  # 1+8 does not carry; 9+5 does
    assert item.carry_dropped_rationale([True, True]) == ("41+38=79; 79+55=124;", 124)
    with pytest.raises(ValueError, match="one flag per step"):
        item.carry_dropped_rationale([True])


def test_bad_variant_is_named():
    with pytest.raises(ValueError, match="unknown variant 'medium'"):
        generate_items("train", 1, 0, variant="medium")
    with pytest.raises(ValueError, match="min_operand"):
        generate_items("train", 1, 0, variant="hard", max_operand=5)
