"""Answers: where Y sits in a completion (:mod:`cepo.answers.parsing`) and whether it equals the gold
(:mod:`cepo.answers.matching`). The lowest layer of the package: data, rewards, coherence and evaluation
all import it, and it imports nothing else from cepo."""

from __future__ import annotations

from typing import Sequence

from cepo.answers.matching import answers_match
from cepo.answers.parsing import DEFAULT_MARKERS, AnswerParser, ParsedCompletion, parse_completion


def resolve_markers(marker: str, parse_markers: Sequence[str] = DEFAULT_MARKERS) -> list[str]:
    """The parser's marker order for a prompt that asked for ``marker``: the asked-for marker first, then
    the other accepted markers in their given order, without repeats."""
    if not marker:
        raise ValueError("prompt.marker is empty; name the answer marker the prompt asks for (e.g. 'answer')")
    return [marker] + [m for m in dict.fromkeys(parse_markers) if m != marker]


__all__ = ["DEFAULT_MARKERS", "AnswerParser", "ParsedCompletion", "answers_match", "parse_completion", "resolve_markers"]
