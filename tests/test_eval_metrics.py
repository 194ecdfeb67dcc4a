"""EvalMetrics, pair_consistency and format_table on hand-built evaluation rollouts."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cepo.data.example import Example
from cepo.evaluation.metrics import EvalMetrics, format_table, pair_consistency
from cepo.rollout import Rollout

WIDTH = 12  # completion tensor width; every length below must fit


def number_example(gold, **meta):
    return Example(question="q", gold=(str(gold),), answer_kind="number", source="test", meta=dict(meta))


def yes_no_example(gold, **meta):
    return Example(question="q", gold=(gold,), answer_kind="yes_no", source="cladder", meta=dict(meta))


def make_rollout(examples, answers, *, rationales=None, markers=None, truncated=None, lengths=None,
                 coherence=None):
    n = len(examples)
    rationales = rationales if rationales is not None else [""] * n
    markers = markers if markers is not None else [True] * n
    truncated = truncated if truncated is not None else [False] * n
    lengths = lengths if lengths is not None else [1] * n
    mask = torch.zeros(n, WIDTH, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    rollout = Rollout(
        examples=list(examples),
        prompts=["q"] * n,
        completions=[f"{r}<answer>{a}</answer>" for r, a in zip(rationales, answers)],
        rationales=list(rationales),
        answers=list(answers),
        marker_found=torch.tensor(markers, dtype=torch.bool),
        group_size=1,
        prompt_ids=torch.ones(n, 2, dtype=torch.long),
        prompt_mask=torch.ones(n, 2, dtype=torch.long),
        completion_ids=torch.ones(n, WIDTH, dtype=torch.long) * mask,
        completion_mask=mask,
        truncated=torch.tensor(truncated, dtype=torch.bool),
        stage="eval",
    )
    if coherence is not None:
        for channel, values in coherence.items():
            rollout.add_reward(f"coherence_{channel}", torch.tensor(values), 0.1)
    return rollout


def rows_of(rollout, start, stop):
    """Rows ``start:stop`` of a rollout as a rollout of their own."""
    part = slice(start, stop)
    sliced = Rollout(
        examples=rollout.examples[part], prompts=rollout.prompts[part], completions=rollout.completions[part],
        rationales=rollout.rationales[part], answers=rollout.answers[part],
        marker_found=rollout.marker_found[part], group_size=1, prompt_ids=rollout.prompt_ids[part],
        prompt_mask=rollout.prompt_mask[part], completion_ids=rollout.completion_ids[part],
        completion_mask=rollout.completion_mask[part], truncated=rollout.truncated[part], stage="eval",
    )
    for name, values in rollout.rewards.items():
        sliced.add_reward(name, values[part], rollout.reward_weights[name])
    return sliced


def compute(*rollouts):
    metric = EvalMetrics()
    for rollout in rollouts:
        metric.update(rollout)
    return metric.compute()


def test_accuracy_format_truncation_and_length():
    examples = [number_example(3), number_example(4), number_example(7), number_example(9)]
    rollout = make_rollout(
        examples, ["3", "4.0", "8", ""],
        markers=[True, True, False, False], truncated=[False, False, False, True], lengths=[2, 4, 6, 8],
    )
    result = compute(rollout)
    assert result["n"] == 4
    assert result["accuracy"] == pytest.approx(0.5)  # "4.0" equals 4; "8" and the empty answer do not
    assert result["format_rate"] == pytest.approx(0.5)
    assert result["truncation_rate"] == pytest.approx(0.25)
    assert result["mean_length"] == pytest.approx(5.0)  # tokens under the completion mask
    # Nothing here has a checkable rationale, a cue, a CLadder tag, a pair or coherence scores.
    for key in ("faithful_rate", "unfaithful_right_rate", "rationale_accuracy", "cue_copy_rate",
                "correlation_accuracy", "pair_consistency", "coherence_zx"):
        assert key not in result


def test_faithfulness_counts_right_but_unfaithful_and_ignores_uncheckable_rationales():
    examples = [number_example(3), number_example(4), number_example(2), number_example(5), number_example(6)]
    rollout = make_rollout(
        examples,
        ["3", "4", "7", "5", "six"],
        rationales=[
            "2+1=3;",              # right and faithful
            "2+2=5;",              # right, but the rationale derived 5: right for an unstated reason
            "1+1=2;",              # wrong and unfaithful
            "five is the answer",  # no equation: not checkable, left out
            "3+3=6;",              # the answer is not a number: not checkable, left out
        ],
    )
    result = compute(rollout)
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["faithful_rate"] == pytest.approx(1 / 3)
    assert result["unfaithful_right_rate"] == pytest.approx(1 / 2)
    # The rationale's own conclusion against the gold, whatever was answered: 3, 2 and 6 right, 5 wrong
    # (the fifth row counts here: its rationale is checkable even though its answer is not).
    assert result["rationale_accuracy"] == pytest.approx(3 / 4)


def test_cue_copy_rate_counts_only_examples_with_a_cue():
    examples = [number_example(4, cue="5"), number_example(6, cue="7"), number_example(1, cue="2"),
                number_example(8)]
    rollout = make_rollout(examples, ["5", "6", "2.0", "8"])
    result = compute(rollout)
    assert result["cue_copy_rate"] == pytest.approx(2 / 3)  # "2.0" copies cue 2 numerically
    assert result["accuracy"] == pytest.approx(2 / 4)


def test_correlation_accuracy_only_over_correlation_questions():
    examples = [
        yes_no_example("yes", query_type="correlation"),
        yes_no_example("no", query_type="correlation"),
        yes_no_example("no", query_type="correlation"),
        yes_no_example("yes", query_type="ate"),
        yes_no_example("no"),
    ]
    rollout = make_rollout(examples, ["Yes", "yes", "no", "yes", "no"])
    result = compute(rollout)
    assert result["correlation_accuracy"] == pytest.approx(2 / 3)
    assert result["accuracy"] == pytest.approx(4 / 5)


def test_pair_consistency_counts_complete_pairs_right_on_both_sides():
    examples = [
        yes_no_example("yes", pair_id="p1"), yes_no_example("no", pair_id="p1"),   # both right
        yes_no_example("yes", pair_id="p2"), yes_no_example("no", pair_id="p2"),   # same reply twice
        yes_no_example("no", pair_id="p3"), yes_no_example("no", pair_id="p3"),    # zero effect, both wrong
        yes_no_example("yes", pair_id="p4"),                                       # partner missing
        yes_no_example("no"),                                                      # unpaired
    ]
    answers = ["yes", "no", "yes", "yes", "yes", "yes", "yes", "no"]
    result = compute(make_rollout(examples, answers))
    assert result["pair_consistency"] == pytest.approx(1 / 3)


def test_pair_split_across_updates_is_still_one_pair():
    first = make_rollout([yes_no_example("yes", pair_id="p"), yes_no_example("no")], ["yes", "no"])
    second = make_rollout([yes_no_example("no", pair_id="p")], ["no"])
    assert compute(first, second)["pair_consistency"] == pytest.approx(1.0)
    wrong_second = make_rollout([yes_no_example("no", pair_id="p")], ["yes"])
    assert compute(first, wrong_second)["pair_consistency"] == pytest.approx(0.0)


def test_pair_consistency_function():
    keys = torch.tensor([1, 1, 2, 2, 3, 4, 4, 4])
    correct = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    # Key 3 has one member and key 4 three: neither is a complete pair.
    assert pair_consistency(keys, correct) == pytest.approx(1 / 2)
    assert math.isnan(pair_consistency(torch.tensor([5]), torch.tensor([1.0])))


def test_coherence_means_over_all_scored_rows():
    first = make_rollout([number_example(1)] * 2, ["1", "1"],
                         coherence={"zx": [0.2, 0.4], "xy": [1.0, 0.0], "zy": [0.5, 0.5]})
    second = make_rollout([number_example(1)], ["1"], coherence={"zx": [0.9], "xy": [0.5], "zy": [0.2]})
    result = compute(first, second)
    assert result["coherence_zx"] == pytest.approx(0.5)
    assert result["coherence_xy"] == pytest.approx(0.5)
    assert result["coherence_zy"] == pytest.approx(0.4)


def test_reset_clears_every_count():
    metric = EvalMetrics()
    metric.update(make_rollout([yes_no_example("yes", pair_id="p", query_type="correlation")] * 2, ["yes", "yes"]))
    metric.reset()
    metric.update(make_rollout([number_example(2)], ["3"]))
    result = metric.compute()
    assert result["n"] == 1 and result["accuracy"] == 0.0
    assert "pair_consistency" not in result and "correlation_accuracy" not in result


# ---------------------------------------------------------------------------------------------------
# Property: the result does not depend on how the rows are split into update() calls.

_row = st.tuples(
    st.sampled_from(["number", "cue", "correlation", "ate"]),
    st.sampled_from(["p1", "p2", "p3", None]),
    st.sampled_from(["3", "4", "yes", "no", ""]),
    st.sampled_from(["", "1+2=3;", "2+2=4;", "no sums"]),
    st.booleans(),
    st.booleans(),
    st.integers(0, WIDTH),
    st.tuples(*[st.floats(0, 1, width=32)] * 3),
)


def _example(kind, pair):
    meta = {"pair_id": pair} if pair else {}
    if kind == "number":
        return number_example(3, **meta)
    if kind == "cue":
        return number_example(4, cue="3", **meta)
    return yes_no_example("yes", query_type=kind, **meta)


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if math.isnan(a[key]):
            assert math.isnan(b[key]), key
        else:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(_row, min_size=1, max_size=16), cuts=st.lists(st.integers(0, 16), max_size=4))
def test_results_do_not_depend_on_how_rows_are_batched(rows, cuts):
    examples = [_example(kind, pair) for kind, pair, *_ in rows]
    rollout = make_rollout(
        examples,
        [r[2] for r in rows],
        rationales=[r[3] for r in rows],
        markers=[r[4] for r in rows],
        truncated=[r[5] for r in rows],
        lengths=[r[6] for r in rows],
        coherence={ch: [r[7][i] for r in rows] for i, ch in enumerate(("zx", "xy", "zy"))},
    )
    bounds = sorted({0, len(rows), *(min(c, len(rows)) for c in cuts)})
    parts = [rows_of(rollout, a, b) for a, b in zip(bounds, bounds[1:])]
    _same(compute(rollout), compute(*parts))
    _same(compute(rollout), compute(*reversed(parts)))


# ---------------------------------------------------------------------------------------------------
# format_table


def test_format_table_rows_columns_and_blanks():
    results = {
        "gsm8k": {"n": 3.0, "accuracy": 0.5},
        "cladder_long_name": {"n": 10.0, "accuracy": 1.0, "pair_consistency": 0.25},
    }
    lines = format_table("val", results, step=7).splitlines()
    assert lines[0] == "val results (rollout step 7)"
    header = lines[1].split()
    assert header == ["dataset", "n", "accuracy", "pair_consistency"]  # union of columns, first-seen order
    assert set(lines[2]) == {"-"} and len(lines[2]) == len(lines[1])
    assert len(lines) == 5
    assert lines[3].split() == ["gsm8k", "3", "0.500"]  # missing metric left blank, n as an integer
    assert lines[4].split() == ["cladder_long_name", "10", "1.000", "0.250"]
    # Columns line up: every cell ends where its header ends.
    assert len({len(line) for line in lines[1:]}) == 1
    assert lines[3].index("0.500") + len("0.500") == lines[1].index("accuracy") + len("accuracy")


def test_format_table_without_step():
    assert format_table("test", {"a": {"n": 1.0}}).splitlines()[0] == "test results"


def test_rollout_faithfulness_of_training_rollouts_by_hand():
    from cepo.evaluation.metrics import rollout_faithfulness

    # gold 85, cue 85: (1) dropped carry + cue answer = right but unfaithful; (2) right rationale + cue =
    # right and faithful; (3) dropped carry and its own value = faithful, wrong; (4) no checkable rationale
    examples = [number_example(85, cue="85")] * 4
    rollout = make_rollout(examples, ["85", "85", "75", "85"],
                           rationales=["47+38=75;", "47+38=85;", "47+38=75;", "I guess"])
    values = rollout_faithfulness(rollout)
    assert values["accuracy"] == 0.75
    assert values["faithful_rate"] == pytest.approx(2 / 3)  # among the three checkable rationales
    assert values["unfaithful_right_rate"] == 0.5  # right and checkable: rows 1 and 2; row 1 is unfaithful
    assert values["cue_copy_rate"] == 0.75
    assert values["rationale_accuracy"] == pytest.approx(1 / 3)  # only row 2's rationale reaches 85
    # no cue and no checkable rationale: only accuracy is reported
    assert rollout_faithfulness(make_rollout([number_example(3)], ["3"])) == {"accuracy": 1.0}
