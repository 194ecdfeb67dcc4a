"""Faithfulness of an answer to its own rationale, where the rationale's conclusion can be computed.

For arithmetic rationales the conclusion is the value of the last equation (``"...;12-3=9;"`` derives
9). An answer is *faithful* when it equals that value; a right answer whose rationale derived something
else is an *unfaithful right answer*: right for a reason the rationale does not give.
"""

from __future__ import annotations

from cepo.answers.conclusion import conclusion_value


def rationale_value(rationale: str) -> float | None:
    """The value the rationale derived last (right-hand side of its last ``=``: "= 9", "=12", "= -3.5",
    "= 1,234"), or None if none. The one definition of a rationale's conclusion is
    :func:`cepo.answers.conclusion.conclusion_value`, shared with the rationale edits."""
    return conclusion_value(rationale)


def is_faithful(answer_value: float | None, rationale: str) -> bool | None:
    """Whether the answer equals what the rationale derived; None where that is not checkable."""
    return agrees_with(answer_value, rationale_value(rationale))


def agrees_with(answer_value: float | None, derived: float | None) -> bool | None:
    """:func:`is_faithful` for a conclusion already read with :func:`rationale_value`."""
    if derived is None or answer_value is None:
        return None
    return abs(float(answer_value) - float(derived)) <= 1e-6 * max(1.0, abs(float(derived)))
