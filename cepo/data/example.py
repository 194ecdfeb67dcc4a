"""The one record type every dataset adapter produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Prompt frames (rendered by cepo.data.prompts); a dataset adapter declares one when it is registered.
# "raw" (alias "plain") is the question verbatim, with no instruction.
PROMPT_FAMILIES = ("math", "multiple_choice", "yes_no", "open", "raw", "plain")


@dataclass(frozen=True)
class Example:
    """One question with its accepted gold answers.

    ``question`` is the task text without any prompt template; the template (and the tokenizer's chat
    template) is applied later, so the same examples serve every model. ``gold`` holds every accepted
    final answer, already extracted from the raw dataset field (``"18"`` from GSM8K's ``"... #### 18"``,
    each alternative of ``"a or b"``). ``answer_kind`` names the matching rule used by
    :func:`cepo.answers.matching.answers_match` (``"number"``, ``"math"``, ``"yes_no"``, ``"choice"``,
    ``"text"`` or ``"auto"``). ``meta`` carries per-source fields that metrics need (split name, cue,
    pair ids, options); its values must be plain JSON types.
    """

    question: str
    gold: tuple[str, ...]
    answer_kind: str = "auto"
    source: str = "unknown"
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
