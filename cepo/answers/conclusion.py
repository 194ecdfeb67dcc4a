"""The number a rationale concludes with: the one definition shared by the faithfulness metric, the
conclusion edit (:class:`cepo.coherence.counterfactuals.ConclusionEdit`) and the reward diagnostics."""

from __future__ import annotations

import re

# The rationale's conclusion: the number on the right of its last "=" ("= 9", "=12", "= $1,234", "= -3.5").
CONCLUSION = re.compile(r"=\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")


def conclusion_span(text: str) -> tuple[int, int] | None:
    """``(start, end)`` of the number the text concludes with (the right side of its last ``=``), or None."""
    last = None
    for last in CONCLUSION.finditer(text):
        pass
    return None if last is None else last.span(1)


def conclusion_value(text: str) -> float | int | None:
    """The number the text concludes with, as int where integral, or None if it has no ``= number``."""
    span = conclusion_span(text)
    if span is None:
        return None
    value = float(text[span[0] : span[1]].replace(",", ""))
    return int(value) if value.is_integer() else value
