"""The one answer parser: split a completion into rationale X and final answer Y.

The accuracy reward, the coherence reward and the evaluation all call :class:`AnswerParser`, so all three
judge the same Y (docs/design.md#segmenting).

Marker kinds, tried in the order given; the first kind that occurs anywhere in the text wins:

- ``"answer"``: ``<answer>...</answer>``;
- ``"finalanswer"``: ``<finalanswer>...</finalanswer>`` (the marker the CE-PO authors asked for);
- ``"boxed"``: ``\\boxed{...}`` or ``\\fbox{...}`` with balanced nested braces (MATH);
- ``"gsm8k"``: a line ``#### value`` whose value starts like a number (GSM8K); a Markdown heading such
  as ``#### Step 2`` is not an answer;
- any other name ``tag``: a custom tag ``<tag>...</tag>``.

Tags are matched case-insensitively and may carry inner spaces (``< answer >``). Within the winning kind
the *last* occurrence is the answer, because models often restate it. An opening tag (or ``\\boxed{``)
that is never closed takes the rest of the text, since generation may have been truncated. With nested
or duplicated tags the last opening tag wins and its content runs to the next closing tag, which keeps
the rule linear-time and never raises. A closing tag without any opening tag does not count as an
occurrence.

X is the text before the winning marker's start and Y the marked content, both stripped. With no
marker, Y is the last sentence of the last non-empty line and X everything before it; ``marker`` is then
``None``. Empty text gives X = Y = "".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

DEFAULT_MARKERS: tuple[str, ...] = ("answer", "finalanswer", "boxed", "gsm8k")

_BOXED_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# The value must start like a number so that Markdown headings ("#### Step 1") are not answers.
_GSM8K_LINE = re.compile(r"^[ \t]*####[ \t]*([-+\u2212$\\(]?[ \t]*[$]?[0-9.][^\n]*)$", re.MULTILINE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_TAG_NAME = re.compile(r"^[A-Za-z_][\w.-]*$")


@dataclass(frozen=True)
class ParsedCompletion:
    """A completion split into rationale and answer.

    ``marker`` names the marker kind that was found (``"answer"``, ``"boxed"``, a custom tag name, ...),
    or is ``None`` when the last-sentence fallback was used.
    """

    rationale: str
    answer: str
    marker: str | None

    @property
    def marker_found(self) -> bool:
        return self.marker is not None


@dataclass(frozen=True)
class _TagPattern:
    open: re.Pattern[str]
    close: re.Pattern[str]


def _tag_pattern(name: str) -> _TagPattern:
    escaped = re.escape(name)
    return _TagPattern(
        open=re.compile(rf"<\s*{escaped}\s*>", re.IGNORECASE),
        close=re.compile(rf"<\s*/\s*{escaped}\s*>", re.IGNORECASE),
    )


class AnswerParser:
    """Split completions into (rationale, answer) by the first marker kind that occurs.

    Args:
        markers: marker kinds in priority order (see the module docstring). Regexes are compiled once
            here, so build one parser and reuse it for every rollout.
    """

    def __init__(self, markers: Sequence[str] = DEFAULT_MARKERS) -> None:
        if isinstance(markers, str):
            markers = (markers,)
        self.markers: tuple[str, ...] = tuple(markers)
        self._tags: dict[str, _TagPattern] = {}
        for marker in self.markers:
            if not isinstance(marker, str) or not marker:
                raise ValueError(f"answer markers must be non-empty strings, got {marker!r}")
            if marker in ("boxed", "gsm8k"):
                continue
            if not _TAG_NAME.match(marker):
                raise ValueError(
                    f"custom answer marker {marker!r} is not a valid tag name; use letters, digits, '_', "
                    "'-' or '.', e.g. 'answer' for <answer>...</answer>"
                )
            self._tags[marker] = _tag_pattern(marker)

    def __call__(self, text: str) -> ParsedCompletion:
        if not text or not text.strip():
            return ParsedCompletion("", "", None)
        for marker in self.markers:
            if marker == "boxed":
                found = _find_boxed(text)
            elif marker == "gsm8k":
                found = _find_gsm8k(text)
            else:
                found = _find_tag(text, self._tags[marker])
            if found is not None:
                start, answer = found
                return ParsedCompletion(text[:start].strip(), answer.strip(), marker)
        return _fallback(text)

    def __repr__(self) -> str:
        return f"AnswerParser(markers={self.markers!r})"


def _find_tag(text: str, tag: _TagPattern) -> tuple[int, str] | None:
    last = None
    for last in tag.open.finditer(text):
        pass
    if last is None:
        return None
    closing = tag.close.search(text, last.end())
    end = closing.start() if closing is not None else len(text)
    return last.start(), text[last.end() : end]


def _find_boxed(text: str) -> tuple[int, str] | None:
    last = None
    for last in _BOXED_OPEN.finditer(text):
        pass
    if last is None:
        return None
    depth = 1
    pos = last.end()
    n = len(text)
    while pos < n:
        char = text[pos]
        if char == "\\":
            pos += 2  # an escaped brace (\{ or \}) does not open or close a group
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return last.start(), text[last.end() : pos]
        pos += 1
    return last.start(), text[last.end() :]


def _find_gsm8k(text: str) -> tuple[int, str] | None:
    last = None
    for last in _GSM8K_LINE.finditer(text):
        pass
    if last is None:
        return None
    return text.index("####", last.start()), last.group(1)


def _fallback(text: str) -> ParsedCompletion:
    body = text.rstrip()
    line_start = body.rfind("\n") + 1
    line = body[line_start:]
    # Y is the last sentence of the last non-empty line.
    sentence_offset = 0
    for match in _SENTENCE_END.finditer(line):
        sentence_offset = match.end()
    start = line_start + sentence_offset
    return ParsedCompletion(body[:start].strip(), body[start:].strip(), None)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``/``\\fbox{...}`` in ``text`` (to the end if unclosed), or None."""
    found = _find_boxed(text)
    return None if found is None else found[1]


def parse_completion(text: str, markers: Sequence[str] = DEFAULT_MARKERS) -> ParsedCompletion:
    """Parse one completion; builds a parser per call, so prefer :class:`AnswerParser` in loops."""
    return AnswerParser(markers)(text)


def answer_instruction(marker: str) -> str:
    """A short prompt sentence telling the model how to mark its final answer for ``marker``."""
    if marker == "boxed":
        return "Think step by step, then give the final answer inside \\boxed{}."
    if marker == "gsm8k":
        return "Think step by step, then write the final answer on a last line of the form '#### <answer>'."
    if not isinstance(marker, str) or not _TAG_NAME.match(marker):
        raise ValueError(f"unknown answer marker {marker!r}")
    return f"Think step by step, then give the final answer as <{marker}>...</{marker}>."
