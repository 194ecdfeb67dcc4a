"""Dataset adapters: one function per dataset from a raw :class:`Row` to an :class:`~cepo.records.Example`,
registered with its prompt family::

    @register_adapter("gsm8k", family="math")
    def gsm8k_adapter(row: Row) -> Example:
        ...

Registration files the :class:`Adapter` in :data:`ADAPTERS` (the shared :class:`~cepo.registry.Registry`)
and its family in :data:`FAMILY_BY_ADAPTER` (read by :mod:`cepo.data.prompts`); that is all a new dataset
needs. A registered adapter is called as ``adapter(records, *, source, on_error="raise",
question_field="question", answer_field="answer")`` and returns ``(examples, skipped)``. A malformed row
(not an object, a missing or empty field, a gold answer that cannot be parsed) raises ``ValueError`` naming
the row and the problem, or with ``on_error="skip"`` is dropped and counted.

When the default field names are used and a row lacks them, the common alternatives are tried
(``problem``/``input`` for the question, ``target`` for the answer), so hub exports of the same
benchmarks load without extra options.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NoReturn, Sequence

from cepo.answers.matching import normalize_number, normalize_text, unmatchable_gold
from cepo.answers.parsing import last_boxed
from cepo.data.readers import ON_ERROR, ON_ERROR_FIX, SKIP_HINT, Skip
from cepo.records import PROMPT_FAMILIES, Example
from cepo.registry import Registry

_QUESTION_ALIASES = ("question", "problem", "input")
_ANSWER_ALIASES = ("answer", "target")


class _RowProblem(Exception):
    """Raised inside an adapter for one bad row; turned into ValueError or a skip by :meth:`Adapter.convert`."""


RowProblem = _RowProblem  # for other row readers (``PromptFile``)


def checked_gold(example: Example) -> Example:
    """``example``, unless none of its gold answers could ever be matched (a placeholder such as ``???``,
    text with no letter or digit, a non-number for kind ``number``): training on it would give reward 0 to
    every sample, so the row is refused (or skipped and counted) like any other malformed row."""
    if example.gold:
        reasons = [unmatchable_gold(gold, example.answer_kind, example.meta.get("options")) for gold in example.gold]
        if all(reasons):
            raise _RowProblem(f"{reasons[0]}, so no answer could ever be right")
    return example


def _field(row: Mapping[str, Any], name: str, defaults: Sequence[str], what: str) -> str:
    names = defaults if name == defaults[0] else (name,)
    for key in names:
        if key in row and row[key] is not None:
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise _RowProblem(f"field {key!r} ({what}) must be text, got {type(value).__name__}")
            text = str(value).strip()
            if not text:
                raise _RowProblem(f"empty {what} in field {key!r}")
            return text
    raise _RowProblem(f"missing {what} field {name!r}")


def _example_id(row: Mapping[str, Any], source: str, index: int) -> str:
    for key in ("id", "idx"):
        if isinstance(row.get(key), (str, int)) and not isinstance(row.get(key), bool):
            return str(row[key])
    return f"{source}-{index}"


@dataclass(frozen=True)
class Row:
    """One raw record as an adapter sees it.

    ``fields`` is the record; ``index`` its 0-based position among the records (``meta["row"]`` and the
    default example id use it); ``source`` the name stored in ``Example.source``; ``question_field`` and
    ``answer_field`` the columns the user named. The helpers raise for a missing or empty field, and an
    adapter calls :func:`reject` for any other problem; either becomes an error naming the row, or a
    counted skip.
    """

    fields: Mapping[str, Any]
    index: int
    source: str
    question_field: str = "question"
    answer_field: str = "answer"

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def text(self, name: str, aliases: Sequence[str] = (), what: str | None = None) -> str:
        """Non-empty text of field ``name`` (or, when ``name`` is ``aliases[0]``, of the first alias present)."""
        return _field(self.fields, name, tuple(aliases) or (name,), what or name)

    def question(self) -> str:
        return _field(self.fields, self.question_field, _QUESTION_ALIASES, "question")

    def answer(self) -> str:
        return _field(self.fields, self.answer_field, _ANSWER_ALIASES, "answer")

    def example(self, question: str, gold: Sequence[str], answer_kind: str, **meta: Any) -> Example:
        """The :class:`Example` of this row: its id, source and ``meta["row"]`` filled in."""
        return Example(
            question=question,
            gold=tuple(gold),
            answer_kind=answer_kind,
            source=self.source,
            id=_example_id(self.fields, self.source, self.index),
            meta={"row": self.index, **meta},
        )


def reject(reason: str) -> NoReturn:
    """Declare the row being converted malformed (an error naming the row, or a counted skip)."""
    raise _RowProblem(reason)


RowConverter = Callable[[Row], Example]
PostProcess = Callable[[list[Example], str], None]


class Adapter:
    """A registered dataset adapter: ``convert`` applied to every row, errors turned into messages or skips.

    Call it as ``adapter(records, *, source=<name>, on_error="raise", question_field="question",
    answer_field="answer")`` to get ``(examples, skipped)``.
    """

    def __init__(self, name: str, family: str, convert: RowConverter, after: PostProcess | None = None) -> None:
        self.name, self.family, self.convert_row, self.after = name, family, convert, after
        self.__doc__ = convert.__doc__
        self.__name__ = getattr(convert, "__name__", name)

    def convert(
        self,
        records: Sequence[Any],
        *,
        source: str | None = None,
        on_error: str = "raise",
        question_field: str = "question",
        answer_field: str = "answer",
        where: Sequence[str] | None = None,
    ) -> tuple[list[Example], list[Skip]]:
        """Examples of ``records`` and the ``(where, why)`` of each skipped row. ``where[i]`` names record i in
        messages (default ``"<source>, record index i"``)."""
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}: {ON_ERROR_FIX}")
        source = source or self.name
        examples: list[Example] = []
        skips: list[Skip] = []
        for index, record in enumerate(records):
            try:
                if not isinstance(record, Mapping):
                    raise _RowProblem(f"expected an object with fields, got {type(record).__name__}")
                examples.append(checked_gold(self.convert_row(Row(record, index, source, question_field, answer_field))))
            except _RowProblem as problem:
                location = where[index] if where is not None else f"{source}, record index {index}"
                if on_error == "raise":
                    raise ValueError(f"{location}: {problem} ({self.name} adapter). {SKIP_HINT}.") from None
                skips.append((location, str(problem)))
        if self.after is not None:
            self.after(examples, source)
        return examples, skips

    def __call__(self, records: Sequence[Any], **options: Any) -> tuple[list[Example], int]:
        examples, skips = self.convert(records, **options)
        return examples, len(skips)

    def __repr__(self) -> str:
        return f"Adapter({self.name!r}, family={self.family!r})"


ADAPTERS: Registry[Adapter] = Registry("dataset adapter")
# Prompt family of each adapter's examples (by ``Example.source``); cepo.data.prompts reads this table.
FAMILY_BY_ADAPTER: dict[str, str] = {}


def register_adapter(name: str, *, family: str, after: PostProcess | None = None):
    """Register a row converter as the adapter ``name`` whose examples are prompted as ``family``.

    ``after(examples, source)`` runs once on the converted examples (CLadder pairs adjacent rows with it).
    Use as a decorator; it returns the :class:`Adapter`.
    """
    if family not in PROMPT_FAMILIES:
        raise ValueError(f"unknown prompt family {family!r} for adapter {name!r}; choose one of {PROMPT_FAMILIES}")

    def decorate(convert: RowConverter) -> Adapter:
        adapter = ADAPTERS.register(name)(Adapter(name, family, convert, after))  # refuses a second "name"
        FAMILY_BY_ADAPTER[name] = family
        return adapter

    return decorate


def _split_or(answer: str) -> tuple[str, ...]:
    """Alternatives joined by " or " ("3 or three"), stripped and deduplicated in order."""
    parts = [part.strip() for part in answer.split(" or ")]
    return tuple(dict.fromkeys(part for part in parts if part))


def _yes_no_gold(answer: str) -> str | None:
    return answer.capitalize() if normalize_text(answer) in ("yes", "no") else None


# ----------------------------------------------------------------------------------------------------
# Adapters


@register_adapter("generic", family="open")
def generic_adapter(row: Row) -> Example:
    """Any rows with a question and an answer field; alternatives are not split; kind ``auto``."""
    return row.example(row.question(), (row.answer(),), "auto")


@register_adapter("gsm8k", family="math")
def gsm8k_adapter(row: Row) -> Example:
    """GSM8K: the gold is the number after the last ``####`` (thousands separators stripped)."""
    solution = row.answer()
    if "####" not in solution:
        reject("answer has no '#### <number>' final line")
    final = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if normalize_number(final) is None:
        reject(f"the text after '####' is not a number: {final[:40]!r}")
    return row.example(row.question(), (final,), "number", solution=solution)


@register_adapter("math", family="math")
def math_adapter(row: Row) -> Example:
    """MATH: the gold is the last ``\\boxed{}`` of the solution (a ``solution`` field, or an answer field
    holding a worked solution), else the answer field; alternatives joined by " or " are each accepted.
    """
    meta = {}
    gold = None
    for key in ("solution", row.answer_field):
        value = row.get(key)
        if isinstance(value, str) and last_boxed(value) is not None:
            gold = last_boxed(value).strip()
            meta["solution"] = value
            break
    if gold is None:
        gold = row.answer()
    alternatives = _split_or(gold)
    if not alternatives:
        reject("empty \\boxed{} answer")
    question = row.text(row.question_field, ("question", "problem"), "question")
    return row.example(question, alternatives, "math", **meta)


# BBEH causal understanding is "open" because its questions allow a third reply ("Ambiguous") and say so.
@register_adapter("bbeh_causal", family="open")
def bbeh_causal_adapter(row: Row) -> Example:
    """BBEH causal understanding: ``Yes``/``No`` (kind ``yes_no``); other labels such as ``Ambiguous``
    are kept as text answers (kind ``text``)."""
    answer = row.answer()
    yes_no = _yes_no_gold(answer)
    return row.example(row.question(), (yes_no or answer,), "yes_no" if yes_no else "text")


@register_adapter("legalbench_causality", family="yes_no")
def legalbench_causality_adapter(row: Row) -> Example:
    """LegalBench legal-reasoning causality: Yes/No (kind ``yes_no``)."""
    answer = row.answer()
    yes_no = _yes_no_gold(answer)
    if yes_no is None:
        reject(f"expected a Yes/No answer, got {answer[:40]!r}")
    return row.example(row.question(), (yes_no,), "yes_no")


_LETTERED_OPTION = re.compile(r"^\s*\(?([A-Z])[.)]\s+(.*\S)\s*$", re.MULTILINE)


def _lettered_options(question: str) -> list[str]:
    """Options written as lines "A. text" (or "(A) text"), read from after the last "Options:" label."""
    block = question[question.rfind("Options:") + len("Options:"):] if "Options:" in question else question
    options = []
    for letter, text in _LETTERED_OPTION.findall(block):
        if ord(letter) - ord("A") != len(options):
            break  # stop at the first letter out of sequence (a stray "I. ..." line in the text)
        options.append(text.strip())
    return options


def _resolve_option(answer: str, options: Sequence[str]) -> int | None:
    letter = re.fullmatch(r"\(?([A-Z])[.)]?", answer.strip())
    if letter is not None:
        index = ord(letter.group(1)) - ord("A")
        return index if index < len(options) else None
    key = normalize_text(answer)
    for index, option in enumerate(options):
        if normalize_text(option) == key:
            return index
    return None


@register_adapter("casehold", family="multiple_choice")
def casehold_adapter(row: Row) -> Example:
    """CaseHOLD: five options A-E listed in the question; the answer is the option text (or its letter).

    The gold accepts the option text and its letter; ``meta["options"]`` holds the five texts and
    ``meta["answer_index"]`` the 0-based index. Hub rows with ``endings`` and an integer ``label`` are
    also accepted; their options are appended to the question.
    """
    if isinstance(row.get("endings"), list) and "label" in row:
        options = [str(option).strip() for option in row.get("endings")]
        context = row.text("context")
        question = context + "\n\nOptions:\n" + "\n".join(
            f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options)
        )
        try:
            answer_index = int(row.get("label"))
        except (TypeError, ValueError):
            reject(f"label {row.get('label')!r} is not an option index")
        if not 0 <= answer_index < len(options):
            reject(f"label {answer_index} is out of range for {len(options)} options")
    else:
        question = row.question()
        options = _lettered_options(question)
        if len(options) < 2:
            reject("no lettered options ('A. ...', 'B. ...') found in the question")
        answer_index = _resolve_option(row.answer(), options)
        if answer_index is None:
            reject("the answer is neither an option text nor an option letter")
    letter = chr(ord("A") + answer_index)
    return row.example(question, (options[answer_index], letter), "choice", options=options,
                       answer_index=answer_index)


@register_adapter("ifqa", family="open")
def ifqa_adapter(row: Row) -> Example:
    """IfQA: short answers, alternatives joined by " or " each accepted; kind ``auto`` (numbers compare
    as numbers, names as normalised text)."""
    alternatives = _split_or(row.answer())
    if not alternatives:
        reject("no answer left after splitting on ' or '")
    return row.example(row.question(), alternatives, "auto")


@register_adapter("bbeh_arithmetic", family="math")
def bbeh_arithmetic_adapter(row: Row) -> Example:
    """BBEH multi-step arithmetic: an integer answer (kind ``number``)."""
    answer = row.answer()
    value = normalize_number(answer)
    if value is None or value != int(value):
        reject(f"expected an integer answer, got {answer[:40]!r}")
    return row.example(row.question(), (str(int(value)),), "number")


# CLadder query types, told apart by the wording of the question after "Question:". The patterns cover
# every question of the CE-PO authors' CLadder export; anything else is "other".
_CLADDER_QUERY_TYPES: tuple[tuple[str, int, re.Pattern[str]], ...] = tuple(
    (name, rung, re.compile(pattern, re.IGNORECASE))
    for name, rung, pattern in (
        ("correlation", 1, r"^Is the (?:chance|probability) of .+ (?:larger|smaller) when observing "),
        ("marginal", 1, r"^Is .+ (?:more|less) likely than .+ overall\?$"),
        ("exp_away", 1, r"^If we look at .+, does the chance of .+ (?:increase|decrease) when "),
        ("collider_bias", 1, r"^If we look at .+, does it mean that "),
        ("ate", 2, r"^Will .+ (?:increase|decrease) the chance of "),
        ("backadj", 2, r"is it more correct to use the Method 1 than Method 2\?$"),
        ("ett", 3, r"^For .+, would it be (?:more|less) likely to see .+ if "),
        ("nde", 3, r"^If we disregard the mediation effect through "),
        ("nie", 3, r"^Does .+ (?:positively|negatively) affect .+ through "),
        ("det_counterfactual", 3, r"^Would .+ if .+ instead of "),
    )
)
_POLARITY_PAIRS = frozenset(
    frozenset(pair)
    for pair in (("increase", "decrease"), ("more", "less"), ("larger", "smaller"),
                 ("positively", "negatively"), ("higher", "lower"))
)


def _cladder_parts(question: str) -> tuple[str, str]:
    if "Question:" not in question:
        return "", question.strip()
    context, query = question.rsplit("Question:", 1)
    return context.strip(), query.strip()


def cladder_query_type(query: str) -> tuple[str, int | None]:
    """(query type, rung of the ladder of causation) of a CLadder question text."""
    for name, rung, pattern in _CLADDER_QUERY_TYPES:
        if pattern.search(query):
            return name, rung
    return "other", None


def _opposite_wording(a: str, b: str) -> bool:
    words_a, words_b = a.split(), b.split()
    if len(words_a) != len(words_b):
        return False
    differences = [(x, y) for x, y in zip(words_a, words_b) if x != y]
    return len(differences) == 1 and frozenset(w.lower() for w in differences[0]) in _POLARITY_PAIRS


def _pair_cladder_rows(examples: list[Example], source: str) -> None:
    """Give adjacent opposite-wording rows a shared ``meta["pair_id"]`` (the rule is in :func:`cladder_adapter`)."""
    position = 0
    while position < len(examples) - 1:
        first, second = examples[position], examples[position + 1]
        context_a, query_a = _cladder_parts(first.question)
        context_b, query_b = _cladder_parts(second.question)
        if (
            second.meta["row"] == first.meta["row"] + 1
            and context_a
            and context_a == context_b
            and _opposite_wording(query_a, query_b)
        ):
            pair_id = f"{source}-pair-{first.meta['row']}"
            first.meta["pair_id"] = pair_id
            second.meta["pair_id"] = pair_id
            position += 2
        else:
            position += 1


@register_adapter("cladder", family="yes_no", after=_pair_cladder_rows)
def cladder_adapter(row: Row) -> Example:
    """CLadder: yes/no causal questions over a stated context.

    ``meta["query_type"]`` is read from the question wording (``"correlation"`` for "Is the chance of Y
    larger when observing X?", also ``marginal``, ``ate``, ``ett``, ``nie``, ``nde``, ``backadj``,
    ``exp_away``, ``collider_bias``, ``det_counterfactual``; ``"other"`` if none fits) and
    ``meta["rung"]`` is its rung (1 association, 2 intervention, 3 counterfactual).

    Pairing rule: rows i and i+1 of the file share ``meta["pair_id"]`` when their context (the text
    before "Question:") is identical and their questions differ in exactly one word that is a polarity
    antonym (increase/decrease, more/less, larger/smaller, positively/negatively, higher/lower). Rows are
    paired greedily from the top, each row at most once. Such pairs usually have opposite answers; both
    are "no" when the effect is zero, so consistency is judged against the gold of each item, not by
    assuming opposite answers. Unpaired rows have no ``pair_id``.
    """
    question = row.question()
    answer = row.answer()
    yes_no = _yes_no_gold(answer)
    if yes_no is None:
        reject(f"expected a yes/no answer, got {answer[:40]!r}")
    _, query = _cladder_parts(question)
    query_type, rung = cladder_query_type(query)
    return row.example(question, (yes_no.lower(),), "yes_no", query_type=query_type, rung=rung)


_INDEX_ANSWER = re.compile(r"^\s*(\d+)\s*,\s*(.*?)\s*$", re.DOTALL)


def _listed_options(question: str) -> list[str] | None:
    """Options written as a Python/JSON list after the last "Options:" label."""
    if "Options:" not in question:
        return None
    tail = question[question.rfind("Options:") + len("Options:"):].strip()
    try:
        options = ast.literal_eval(tail)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if isinstance(options, (list, tuple)) and options and all(isinstance(o, str) for o in options):
        return [o.strip() for o in options]
    return None


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1].strip()
    return text.strip()


@register_adapter("logiqa", family="multiple_choice")
def logiqa_adapter(row: Row) -> Example:
    """LogiQA: options listed in the question (``Options: [...]`` or lettered lines) or in an ``options``
    field; the answer is ``<index>, "<text>"`` with a 0-based index (a bare index or a letter also works).

    The gold accepts the option text, its letter and its index; ``meta["options"]`` holds the options and
    ``meta["answer_index"]`` the index. A row whose stated text disagrees with the indexed option is
    malformed.
    """
    question = row.question()
    options = row.get("options") if isinstance(row.get("options"), list) else None
    options = [str(o).strip() for o in options] if options else None
    options = options or _listed_options(question) or _lettered_options(question)
    if not options or len(options) < 2:
        reject("no options found (expected 'Options: [...]' in the question)")
    raw = row.get(row.answer_field) if isinstance(row.get(row.answer_field), int) else row.answer()
    if isinstance(raw, int) and not isinstance(raw, bool):
        answer_index = raw
    elif (match := _INDEX_ANSWER.match(raw)) is not None:
        answer_index = int(match.group(1))
        stated = _unquote(match.group(2))
        if stated and 0 <= answer_index < len(options) and normalize_text(stated) != normalize_text(
            options[answer_index]
        ):
            reject(f"answer text does not match option {answer_index}")
    else:
        answer_index = _resolve_option(raw, options)
        if answer_index is None:
            reject(f"cannot read an option from the answer {raw[:40]!r}")
    if not 0 <= answer_index < len(options):
        reject(f"answer index {answer_index} is out of range for {len(options)} options")
    return row.example(question, (options[answer_index], chr(ord("A") + answer_index), str(answer_index)),
                       "choice", options=options, answer_index=answer_index)
