"""Prompt templates per dataset family.

A template turns an :class:`Example` into the prompt text Z: a family-specific frame around the question,
an instruction to reason step by step and mark the final answer with the parser's marker
(:func:`cepo.answers.parsing.answer_instruction`), and optionally the tokenizer's chat template.

Families: ``"math"``, ``"multiple_choice"``, ``"yes_no"``, ``"open"`` and ``"raw"`` (alias ``"plain"``),
which uses the question verbatim with no instruction (the synthetic shortcut task is written that way).
"""

from __future__ import annotations

from typing import Any

from cepo.answers.parsing import answer_instruction
from cepo.data.adapters import FAMILY_BY_ADAPTER
from cepo.records import PROMPT_FAMILIES, Example

FAMILIES = PROMPT_FAMILIES

# FAMILY_BY_ADAPTER is filled by cepo.data.adapters.register_adapter; sources without an adapter:
_FAMILY_BY_SOURCE = {"shortcut": "raw"}  # the embedded task writes its prompts verbatim

_FAMILY_BY_KIND = {"math": "math", "number": "math", "choice": "multiple_choice", "yes_no": "yes_no"}


def family_for(example: Example) -> str:
    """The default family: the one its adapter registered (by ``example.source``), else by its answer kind."""
    if example.source in FAMILY_BY_ADAPTER:
        return FAMILY_BY_ADAPTER[example.source]
    if example.source in _FAMILY_BY_SOURCE:
        return _FAMILY_BY_SOURCE[example.source]
    return _FAMILY_BY_KIND.get(example.answer_kind, "open")


def _options_block(example: Example) -> str:
    options = example.meta.get("options")
    if not isinstance(options, list) or not options:
        return ""
    if all(str(option) in example.question for option in options):
        return ""  # the question already lists them (CaseHOLD, LogiQA)
    lines = [f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options)]
    return "\n\nOptions:\n" + "\n".join(lines)


def _body(example: Example, family: str, marker: str) -> str:
    question = example.question.strip()
    instruction = answer_instruction(marker)
    if family == "math":
        return f"Solve the following problem.\n\n{question}\n\n{instruction}"
    if family == "multiple_choice":
        return (
            f"Answer the following multiple-choice question.\n\n{question}{_options_block(example)}\n\n"
            f"{instruction} The final answer should be the letter or the text of one option."
        )
    if family == "yes_no":
        return (
            f"Answer the following question.\n\n{question}\n\n{instruction} "
            "The final answer should be Yes or No."
        )
    return f"Answer the following question.\n\n{question}\n\n{instruction} Keep the final answer short."


class PromptTemplate:
    """Render examples as prompts.

    Args:
        family: one of :data:`FAMILIES`, or ``None`` to pick per example with :func:`family_for`.
    """

    def __init__(self, family: str | None = None) -> None:
        if family is not None and family not in FAMILIES:
            raise ValueError(f"unknown prompt family {family!r}; choose one of {', '.join(FAMILIES)}")
        self.family = family

    def render(
        self,
        example: Example,
        tokenizer: Any = None,
        use_chat_template: bool = False,
        marker: str = "answer",
        system_prompt: str | None = None,
    ) -> str:
        """The prompt text for ``example``.

        Args:
            example: the example to render.
            tokenizer: needed only with ``use_chat_template``.
            use_chat_template: wrap the text as a user turn (after an optional system turn) with
                ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``.
            marker: the answer marker the model is asked to use; must match the parser's markers.
            system_prompt: a system message; without a chat template it is prepended as a paragraph.
        """
        family = self.family or family_for(example)
        body = example.question if family in ("raw", "plain") else _body(example, family, marker)
        if use_chat_template:
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ValueError(
                    "use_chat_template=True needs a tokenizer with a chat template; this tokenizer has "
                    "none, so set use_chat_template false (or load an instruct/chat tokenizer)"
                )
            messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
            messages.append({"role": "user", "content": body})
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if system_prompt:
            return f"{system_prompt.strip()}\n\n{body}"
        return body

    def __repr__(self) -> str:
        return f"PromptTemplate(family={self.family!r})"


def render_prompt(
    example: Example,
    family: str | None = None,
    tokenizer: Any = None,
    use_chat_template: bool = False,
    marker: str = "answer",
    system_prompt: str | None = None,
) -> str:
    """Functional form of :meth:`PromptTemplate.render`."""
    return PromptTemplate(family).render(
        example, tokenizer=tokenizer, use_chat_template=use_chat_template, marker=marker,
        system_prompt=system_prompt,
    )
