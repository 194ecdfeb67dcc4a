"""Dataset adapters: raw rows (local JSON/JSONL/CSV or a Hugging Face hub dataset) to :class:`Example`.

Every adapter has the signature ``adapter(records, *, source, on_error="raise", question_field="question",
answer_field="answer") -> (examples, skipped)`` and is registered by name in :data:`ADAPTERS`;
:func:`load_examples` is the usual entry point. A malformed row (not an object, a missing or empty field,
a gold answer that cannot be parsed) raises ``ValueError`` naming the source, the row index and the
problem, or with ``on_error="skip"`` is dropped and counted in ``LoadedDataset.skipped``.

When the default field names are used and a row lacks them, the common alternatives are tried
(``problem``/``input`` for the question, ``target`` for the answer), so hub exports of the same
benchmarks load without extra options.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from cepo.data.example import Example
from cepo.answers.matching import normalize_number, normalize_text
from cepo.answers.parsing import last_boxed

ON_ERROR = ("raise", "skip")
_QUESTION_ALIASES = ("question", "problem", "input")
_ANSWER_ALIASES = ("answer", "target")
_DATA_SUFFIXES = (".json", ".jsonl", ".csv")

# The CE-PO authors' files (``cepo-paper/train`` and ``cepo-paper/eval``) and the adapter for each.
PAPER_TRAIN_FILES: dict[str, str] = {
    "bbeh_causal": "bbeh_causal_understanding.json",
    "casehold": "casehold_bbeh.json",
    "math": "MATH_Hard_200_bbeh.json",
    "ifqa": "ifqa_200_bbeh_or_answers.json",
}
PAPER_EVAL_FILES: dict[str, str] = {
    "bbeh_arithmetic": "bbeh_multistep_arithmetic_qa.json",
    "cladder": "cladder_qa.json",
    "legalbench_causality": "legalbench_legal_reasoning_causality_qa.json",
    "logiqa": "LogiQA.json",
}


@dataclass
class LoadedDataset:
    """The examples an adapter produced, how many rows it skipped, and the source name it used."""

    examples: list[Example]
    skipped: int
    source: str

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)


class _RowProblem(Exception):
    """Raised inside an adapter for one bad row; turned into ValueError or a skip by :func:`_run_rows`."""


# ----------------------------------------------------------------------------------------------------
# Reading raw records


def _looks_like_path(name: str) -> bool:
    # "owner/name" (one slash, no file suffix) is a hub id; anything else with a slash or a file-like
    # suffix is meant as a local path.
    suffix = Path(name).suffix
    if suffix[1:].isalpha():
        return True
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _records_from_json(path: Path, split: str | None) -> list[Any]:
    with path.open(encoding="utf-8") as handle:
        data = json.load(handle)
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for key in (split, "data", "rows"):
            if key is not None and isinstance(data.get(key), list):
                return data[key]
    keys = ["data", "rows"] + ([split] if split else [])
    raise ValueError(f"{path}: expected a JSON list of records or an object with a list under {keys}")


def _records_from_jsonl(path: Path) -> list[Any]:
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {line_number} is not valid JSON ({error.msg})") from None
    return records


def _records_from_csv(path: Path) -> list[Any]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return [dict(row) for row in csv.DictReader(handle)]


def _records_from_hub(name: str, split: str | None, config_name: str | None) -> list[Any]:
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"{name!r} is not a local file, so it is loaded from the Hugging Face hub, which needs the "
            "optional 'datasets' package: pip install 'cepo[hub]'"
        ) from error
    dataset = datasets.load_dataset(name, config_name, split=split or "train")
    return [dict(row) for row in dataset]


def load_records(path_or_name: str, split: str | None = None, *, config_name: str | None = None) -> list[dict]:
    """Raw rows from a local ``.json``/``.jsonl``/``.csv`` file, a folder, or a hub dataset name.

    A ``.json`` file holds a list of rows, or an object with the list under ``split``, ``"data"`` or
    ``"rows"``. A folder is searched for ``<split>.jsonl``/``.json``/``.csv``. Anything else is passed to
    ``datasets.load_dataset(path_or_name, config_name, split=split or "train")`` (optional dependency).
    A missing local path (one with a file suffix, or a slash other than a hub ``owner/name``) raises
    ``FileNotFoundError``.
    """
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        if split is None:
            raise ValueError(f"{path} is a folder; pass split='train' (or another split) to pick a file in it")
        for suffix in (".jsonl", ".json", ".csv"):
            candidate = path / f"{split}{suffix}"
            if candidate.is_file():
                return load_records(str(candidate), split)
        raise FileNotFoundError(f"no {split}.jsonl, {split}.json or {split}.csv in {path}")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json":
            return _records_from_json(path, split)
        if suffix == ".jsonl":
            return _records_from_jsonl(path)
        if suffix == ".csv":
            return _records_from_csv(path)
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(_DATA_SUFFIXES)}")
    if _looks_like_path(path_or_name):
        raise FileNotFoundError(f"dataset file not found: {path_or_name}")
    return _records_from_hub(path_or_name, split, config_name)


# ----------------------------------------------------------------------------------------------------
# Row helpers


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


def _question(row: Mapping[str, Any], name: str) -> str:
    return _field(row, name, _QUESTION_ALIASES, "question")


def _answer(row: Mapping[str, Any], name: str) -> str:
    return _field(row, name, _ANSWER_ALIASES, "answer")


def _example_id(row: Mapping[str, Any], source: str, index: int) -> str:
    for key in ("id", "idx"):
        if isinstance(row.get(key), (str, int)) and not isinstance(row.get(key), bool):
            return str(row[key])
    return f"{source}-{index}"


def _split_or(answer: str) -> tuple[str, ...]:
    """Alternatives joined by " or " ("3 or three"), stripped and deduplicated in order."""
    parts = [part.strip() for part in answer.split(" or ")]
    return tuple(dict.fromkeys(part for part in parts if part))


def _run_rows(
    records: Sequence[Any],
    source: str,
    on_error: str,
    convert: Callable[[Mapping[str, Any], int], Example],
) -> tuple[list[Example], int]:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    examples: list[Example] = []
    skipped = 0
    for index, row in enumerate(records):
        try:
            if not isinstance(row, Mapping):
                raise _RowProblem(f"expected an object with fields, got {type(row).__name__}")
            examples.append(convert(row, index))
        except _RowProblem as problem:
            if on_error == "raise":
                raise ValueError(
                    f"{source}: row {index}: {problem}. Fix the data, or pass on_error=\"skip\" to drop "
                    "malformed rows (they are counted in LoadedDataset.skipped)."
                ) from None
            skipped += 1
    return examples, skipped


def _base_meta(index: int, **extra: Any) -> dict[str, Any]:
    return {"row": index, **extra}


# ----------------------------------------------------------------------------------------------------
# Adapters


def generic_adapter(records, *, source="generic", on_error="raise", question_field="question",
                    answer_field="answer"):
    """Any rows with a question and an answer field; alternatives are not split; kind ``auto``."""

    def convert(row, index):
        return Example(
            question=_question(row, question_field),
            gold=(_answer(row, answer_field),),
            answer_kind="auto",
            source=source,
            id=_example_id(row, source, index),
            meta=_base_meta(index),
        )

    return _run_rows(records, source, on_error, convert)


def gsm8k_adapter(records, *, source="gsm8k", on_error="raise", question_field="question",
                  answer_field="answer"):
    """GSM8K: the gold is the number after the last ``####`` (thousands separators stripped)."""

    def convert(row, index):
        solution = _answer(row, answer_field)
        if "####" not in solution:
            raise _RowProblem("answer has no '#### <number>' final line")
        final = solution.rsplit("####", 1)[1].strip().replace(",", "")
        if normalize_number(final) is None:
            raise _RowProblem(f"the text after '####' is not a number: {final[:40]!r}")
        return Example(
            question=_question(row, question_field),
            gold=(final,),
            answer_kind="number",
            source=source,
            id=_example_id(row, source, index),
            meta=_base_meta(index, solution=solution),
        )

    return _run_rows(records, source, on_error, convert)


def math_adapter(records, *, source="math", on_error="raise", question_field="question",
                 answer_field="answer"):
    """MATH: the gold is the last ``\\boxed{}`` of the solution (a ``solution`` field, or an answer field
    holding a worked solution), else the answer field; alternatives joined by " or " are each accepted.
    """

    def convert(row, index):
        meta = _base_meta(index)
        gold = None
        for key in ("solution", answer_field):
            value = row.get(key)
            if isinstance(value, str) and last_boxed(value) is not None:
                gold = last_boxed(value).strip()
                meta["solution"] = value
                break
        if gold is None:
            gold = _answer(row, answer_field)
        alternatives = _split_or(gold)
        if not alternatives:
            raise _RowProblem("empty \\boxed{} answer")
        question = _field(row, question_field, ("question", "problem"), "question")
        return Example(question, alternatives, "math", source, _example_id(row, source, index), meta)

    return _run_rows(records, source, on_error, convert)


def _yes_no_gold(answer: str) -> str | None:
    return answer.capitalize() if normalize_text(answer) in ("yes", "no") else None


def bbeh_causal_adapter(records, *, source="bbeh_causal", on_error="raise", question_field="question",
                        answer_field="answer"):
    """BBEH causal understanding: ``Yes``/``No`` (kind ``yes_no``); other labels such as ``Ambiguous``
    are kept as text answers (kind ``text``)."""

    def convert(row, index):
        answer = _answer(row, answer_field)
        yes_no = _yes_no_gold(answer)
        return Example(
            question=_question(row, question_field),
            gold=(yes_no or answer,),
            answer_kind="yes_no" if yes_no else "text",
            source=source,
            id=_example_id(row, source, index),
            meta=_base_meta(index),
        )

    return _run_rows(records, source, on_error, convert)


def _strict_yes_no_adapter(default_source: str):
    def adapter(records, *, source=default_source, on_error="raise", question_field="question",
                answer_field="answer"):
        def convert(row, index):
            answer = _answer(row, answer_field)
            yes_no = _yes_no_gold(answer)
            if yes_no is None:
                raise _RowProblem(f"expected a Yes/No answer, got {answer[:40]!r}")
            return Example(
                question=_question(row, question_field),
                gold=(yes_no,),
                answer_kind="yes_no",
                source=source,
                id=_example_id(row, source, index),
                meta=_base_meta(index),
            )

        return _run_rows(records, source, on_error, convert)

    return adapter


legalbench_causality_adapter = _strict_yes_no_adapter("legalbench_causality")
legalbench_causality_adapter.__name__ = "legalbench_causality_adapter"
legalbench_causality_adapter.__doc__ = "LegalBench legal-reasoning causality: Yes/No (kind ``yes_no``)."


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


def casehold_adapter(records, *, source="casehold", on_error="raise", question_field="question",
                     answer_field="answer"):
    """CaseHOLD: five options A-E listed in the question; the answer is the option text (or its letter).

    The gold accepts the option text and its letter; ``meta["options"]`` holds the five texts and
    ``meta["answer_index"]`` the 0-based index. Hub rows with ``endings`` and an integer ``label`` are
    also accepted; their options are appended to the question.
    """

    def convert(row, index):
        if isinstance(row.get("endings"), list) and "label" in row:
            options = [str(option).strip() for option in row["endings"]]
            context = _field(row, "context", ("context",), "context")
            question = context + "\n\nOptions:\n" + "\n".join(
                f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options)
            )
            try:
                answer_index = int(row["label"])
            except (TypeError, ValueError):
                raise _RowProblem(f"label {row['label']!r} is not an option index") from None
            if not 0 <= answer_index < len(options):
                raise _RowProblem(f"label {answer_index} is out of range for {len(options)} options")
        else:
            question = _question(row, question_field)
            options = _lettered_options(question)
            if len(options) < 2:
                raise _RowProblem("no lettered options ('A. ...', 'B. ...') found in the question")
            answer_index = _resolve_option(_answer(row, answer_field), options)
            if answer_index is None:
                raise _RowProblem("the answer is neither an option text nor an option letter")
        letter = chr(ord("A") + answer_index)
        return Example(
            question=question,
            gold=(options[answer_index], letter),
            answer_kind="choice",
            source=source,
            id=_example_id(row, source, index),
            meta=_base_meta(index, options=options, answer_index=answer_index),
        )

    return _run_rows(records, source, on_error, convert)


def ifqa_adapter(records, *, source="ifqa", on_error="raise", question_field="question",
                 answer_field="answer"):
    """IfQA: short answers, alternatives joined by " or " each accepted; kind ``auto`` (numbers compare
    as numbers, names as normalised text)."""

    def convert(row, index):
        alternatives = _split_or(_answer(row, answer_field))
        if not alternatives:
            raise _RowProblem("no answer left after splitting on ' or '")
        return Example(
            question=_question(row, question_field),
            gold=alternatives,
            answer_kind="auto",
            source=source,
            id=_example_id(row, source, index),
            meta=_base_meta(index),
        )

    return _run_rows(records, source, on_error, convert)


def bbeh_arithmetic_adapter(records, *, source="bbeh_arithmetic", on_error="raise",
                            question_field="question", answer_field="answer"):
    """BBEH multi-step arithmetic: an integer answer (kind ``number``)."""

    def convert(row, index):
        answer = _answer(row, answer_field)
        value = normalize_number(answer)
        if value is None or value != int(value):
            raise _RowProblem(f"expected an integer answer, got {answer[:40]!r}")
        return Example(
            question=_question(row, question_field),
            gold=(str(int(value)),),
            answer_kind="number",
            source=source,
            id=_example_id(row, source, index),
            meta=_base_meta(index),
        )

    return _run_rows(records, source, on_error, convert)


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


def cladder_adapter(records, *, source="cladder", on_error="raise", question_field="question",
                    answer_field="answer"):
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

    def convert(row, index):
        question = _question(row, question_field)
        answer = _answer(row, answer_field)
        yes_no = _yes_no_gold(answer)
        if yes_no is None:
            raise _RowProblem(f"expected a yes/no answer, got {answer[:40]!r}")
        context, query = _cladder_parts(question)
        query_type, rung = cladder_query_type(query)
        meta = _base_meta(index, query_type=query_type, rung=rung)
        return Example(question, (yes_no.lower(),), "yes_no", source, _example_id(row, source, index), meta)

    examples, skipped = _run_rows(records, source, on_error, convert)
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
    return examples, skipped


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


def logiqa_adapter(records, *, source="logiqa", on_error="raise", question_field="question",
                   answer_field="answer"):
    """LogiQA: options listed in the question (``Options: [...]`` or lettered lines) or in an ``options``
    field; the answer is ``<index>, "<text>"`` with a 0-based index (a bare index or a letter also works).

    The gold accepts the option text, its letter and its index; ``meta["options"]`` holds the options and
    ``meta["answer_index"]`` the index. A row whose stated text disagrees with the indexed option is
    malformed.
    """

    def convert(row, index):
        question = _question(row, question_field)
        options = row.get("options") if isinstance(row.get("options"), list) else None
        options = [str(o).strip() for o in options] if options else None
        options = options or _listed_options(question) or _lettered_options(question)
        if not options or len(options) < 2:
            raise _RowProblem("no options found (expected 'Options: [...]' in the question)")
        raw = row.get(answer_field) if isinstance(row.get(answer_field), int) else _answer(row, answer_field)
        if isinstance(raw, int) and not isinstance(raw, bool):
            answer_index = raw
        elif (match := _INDEX_ANSWER.match(raw)) is not None:
            answer_index = int(match.group(1))
            stated = _unquote(match.group(2))
            if stated and 0 <= answer_index < len(options) and normalize_text(stated) != normalize_text(
                options[answer_index]
            ):
                raise _RowProblem(f"answer text does not match option {answer_index}")
        else:
            answer_index = _resolve_option(raw, options)
            if answer_index is None:
                raise _RowProblem(f"cannot read an option from the answer {raw[:40]!r}")
        if not 0 <= answer_index < len(options):
            raise _RowProblem(f"answer index {answer_index} is out of range for {len(options)} options")
        return Example(
            question=question,
            gold=(options[answer_index], chr(ord("A") + answer_index), str(answer_index)),
            answer_kind="choice",
            source=source,
            id=_example_id(row, source, index),
            meta=_base_meta(index, options=options, answer_index=answer_index),
        )

    return _run_rows(records, source, on_error, convert)


Adapter = Callable[..., tuple[list[Example], int]]

ADAPTERS: dict[str, Adapter] = {
    "generic": generic_adapter,
    "gsm8k": gsm8k_adapter,
    "math": math_adapter,
    "bbeh_causal": bbeh_causal_adapter,
    "casehold": casehold_adapter,
    "ifqa": ifqa_adapter,
    "bbeh_arithmetic": bbeh_arithmetic_adapter,
    "cladder": cladder_adapter,
    "legalbench_causality": legalbench_causality_adapter,
    "logiqa": logiqa_adapter,
}


# ----------------------------------------------------------------------------------------------------
# Entry points


def sample_examples(examples: Sequence[Example], limit: int | None, seed: int = 42) -> list[Example]:
    """Up to ``limit`` examples drawn without replacement with ``seed``, kept in their original order."""
    if limit is None or limit >= len(examples):
        return list(examples)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    chosen = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in chosen]


def _source_name(path_or_name: str) -> str:
    path = Path(path_or_name)
    return path.stem if path.suffix else path_or_name


def load_examples(
    path_or_name: str,
    adapter: str = "generic",
    *,
    split: str | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    on_error: str = "raise",
    limit: int | None = None,
    seed: int = 42,
    config_name: str | None = None,
    source: str | None = None,
) -> LoadedDataset:
    """Load a dataset and convert it with the named adapter.

    Args:
        path_or_name: a local ``.json``/``.jsonl``/``.csv`` file or folder, or a hub dataset name.
        adapter: a key of :data:`ADAPTERS`.
        split: the split for hub datasets and folders (hub default ``"train"``).
        question_field: the row field holding the question.
        answer_field: the row field holding the answer.
        on_error: ``"raise"`` on a malformed row, or ``"skip"`` to drop and count it.
        limit: keep at most this many examples, sampled with ``seed`` (original order kept).
        seed: the sampling seed.
        config_name: the hub configuration (e.g. ``"main"`` for ``openai/gsm8k``).
        source: the name stored in ``Example.source``; default the adapter name, or the file stem for
            the generic adapter.
    """
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown dataset adapter {adapter!r}; choose one of {', '.join(ADAPTERS)}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if source is None:
        source = adapter if adapter != "generic" else _source_name(path_or_name)
    records = load_records(path_or_name, split, config_name=config_name)
    try:
        examples, skipped = ADAPTERS[adapter](
            records, source=source, on_error=on_error, question_field=question_field, answer_field=answer_field
        )
    except ValueError as err:  # name the file, not only the adapter and row
        raise ValueError(f"{path_or_name}: {err}") from None
    return LoadedDataset(sample_examples(examples, limit, seed), skipped, source)


def split_train_val(
    examples: Sequence[Example], val_fraction: float = 0.2, seed: int = 42
) -> tuple[list[Example], list[Example]]:
    """Shuffle with ``seed`` and hold out ``round(n * val_fraction)`` examples; both parts keep file order."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = math.floor(len(examples) * val_fraction + 0.5)
    held_out = set(order[:n_val])
    train = [examples[i] for i in range(len(examples)) if i not in held_out]
    val = [examples[i] for i in range(len(examples)) if i in held_out]
    return train, val


def find_data_file(root: str | Path, filename: str) -> Path:
    """``root/filename``, ``root/train/filename``, ``root/eval/filename``, else the first match below root."""
    root = Path(root).expanduser()
    for candidate in (root / filename, root / "train" / filename, root / "eval" / filename):
        if candidate.is_file():
            return candidate
    matches = sorted(root.rglob(filename)) if root.is_dir() else []
    if not matches:
        raise FileNotFoundError(f"{filename} not found under {root}")
    return matches[0]


def _with_split(example: Example, split: str) -> Example:
    return replace(example, meta={**example.meta, "split": split})


def paper_training_mix(
    root: str, per_source: int = 200, val_fraction: float = 0.2, seed: int = 42
) -> tuple[list[Example], list[Example]]:
    """The CE-PO authors' training mixture: BBEH causal understanding, CaseHOLD, MATH-Hard and IfQA.

    Each of the four files (found under ``root``, see :func:`find_data_file`) contributes up to
    ``per_source`` examples (sampled with ``seed`` when it has more) and is split on its own into
    train/validation with ``val_fraction`` and ``seed``, so both parts hold every source in the same
    proportion. Returns ``(train, val)``, sources concatenated in a fixed order; every example's
    ``meta["split"]`` says which part it is in. Deterministic for a given seed.
    """
    train: list[Example] = []
    val: list[Example] = []
    for adapter, filename in PAPER_TRAIN_FILES.items():
        loaded = load_examples(str(find_data_file(root, filename)), adapter, limit=per_source, seed=seed)
        source_train, source_val = split_train_val(loaded.examples, val_fraction, seed)
        train.extend(_with_split(example, "train") for example in source_train)
        val.extend(_with_split(example, "val") for example in source_val)
    return train, val
