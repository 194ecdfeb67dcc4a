"""Dataset adapters: raw rows (local files, `datasets` folders or a Hugging Face hub dataset) to :class:`Example`.

An adapter is one function from a :class:`Row` to an :class:`Example`, registered with its prompt family::

    @register_adapter("gsm8k", family="math")
    def gsm8k_adapter(row: Row) -> Example:
        ...

Registration fills :data:`ADAPTERS` (name -> :class:`Adapter`) and :data:`FAMILY_BY_ADAPTER` (name -> prompt
family, read by :mod:`cepo.data.prompts`); that is all a new dataset needs. A registered adapter is called
as ``adapter(records, *, source, on_error="raise", question_field="question", answer_field="answer")`` and
returns ``(examples, skipped)``; :func:`load_examples` is the usual entry point.

A row that cannot be read (a JSONL line that is not JSON, bytes that are not UTF-8) or is malformed (not an
object, a missing or empty field, a gold answer that cannot be parsed) raises ``ValueError`` naming the file,
the line (1-based, as an editor shows it) and the problem; with ``on_error="skip"`` it is dropped and counted
in ``LoadedDataset.skipped``, its location and reason kept in ``LoadedDataset.skips``.

When the default field names are used and a row lacks them, the common alternatives are tried
(``problem``/``input`` for the question, ``target`` for the answer), so hub exports of the same
benchmarks load without extra options.
"""

from __future__ import annotations

import ast
import csv
import http.client
import json
import math
import os
import random
import re
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NoReturn, Sequence

from cepo.answers.matching import normalize_number, normalize_text
from cepo.answers.parsing import last_boxed
from cepo.data.example import PROMPT_FAMILIES, Example

ON_ERROR = ("raise", "skip")
_QUESTION_ALIASES = ("question", "problem", "input")
_ANSWER_ALIASES = ("answer", "target")
_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
_FOLDER_SUFFIXES = (".jsonl", ".json", ".csv")  # <split><suffix> in a plain folder, in this order of preference
_SKIP_HINT = (
    'Fix the data, or set on_error="skip" (on_error: skip in a FileDataset config) to drop such rows; '
    "they are counted as skipped"
)
# Seconds to wait for the hub before a dataset id is declared unreachable (DNS included).
HUB_PROBE_TIMEOUT_S = 5.0

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

Skip = tuple[str, str]  # (where: "data/x.jsonl, line 7", why: "missing answer field 'answer'")


@dataclass
class LoadedDataset:
    """The examples an adapter produced, how many rows it skipped, and the source name it used.

    ``skips`` holds ``(where, why)`` for every skipped row, unreadable or malformed, in file order.
    """

    examples: list[Example]
    skipped: int
    source: str
    skips: list[Skip] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)


class _RowProblem(Exception):
    """Raised inside an adapter for one bad row; turned into ValueError or a skip by :meth:`Adapter.convert`."""


# ----------------------------------------------------------------------------------------------------
# Reading raw records


@dataclass
class _Records:
    """Raw rows, where each one is (for messages), and the rows already dropped as unreadable.

    ``position`` maps a row's ``where`` to its place in the file, so skips can be listed in file order.
    """

    rows: list[Any] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    position: dict[str, int] = field(default_factory=dict)

    def reject(self, where: str, why: str, on_error: str) -> None:
        if on_error == "raise":
            raise ValueError(f"{where}: {why}. {_SKIP_HINT}.")
        self.position[where] = len(self.position)
        self.skips.append((where, why))

    def add(self, row: Any, where: str, on_error: str) -> None:
        problem = _undecodable(row)
        if problem is not None:
            self.reject(where, problem, on_error)
        else:
            self.position[where] = len(self.position)
            self.rows.append(row)
            self.where.append(where)


# Text is decoded with errors="surrogateescape": a byte that is not UTF-8 becomes U+DC80..U+DCFF, so a
# file with one bad byte still parses and the row that holds it can be named (or skipped).
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _undecodable(row: Any, field_name: str | None = None) -> str | None:
    """Why ``row`` is unreadable (a byte that is not UTF-8 somewhere in it), or None."""
    if isinstance(row, str):
        match = _ESCAPED_BYTE.search(row)
        if match is None:
            return None
        inside = f" in field {field_name!r}" if field_name is not None else ""
        return f"byte 0x{ord(match.group()) - 0xDC00:02x}{inside} is not valid UTF-8; save the file as UTF-8"
    if isinstance(row, Mapping):
        for key, value in row.items():
            name = str(key) if field_name is None else field_name
            problem = _undecodable(str(key), name) or _undecodable(value, name)
            if problem is not None:
                return problem
    elif isinstance(row, list):
        for value in row:
            problem = _undecodable(value, field_name)
            if problem is not None:
                return problem
    return None


def _read_text(path: Path) -> str:
    # utf-8-sig drops a byte-order mark that some editors write; newlines are normalised to "\n".
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as handle:
        return handle.read()


def _looks_like_path(name: str) -> bool:
    # "owner/name" (one slash, no file suffix) is a hub id; anything else with a slash or a file-like
    # suffix is meant as a local path.
    suffix = Path(name).suffix
    if suffix[1:].isalpha():
        return True
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _json_list_lines(text: str) -> list[int]:
    """The 1-based line on which each element of the top-level JSON list in ``text`` starts.

    ``text`` must already have parsed as a JSON list; this walks it again with ``raw_decode``.
    """
    decoder = json.JSONDecoder()
    space = re.compile(r"\s*")
    position = space.match(text, text.index("[") + 1).end()
    lines: list[int] = []
    line, counted_to = 1, 0
    while not text.startswith("]", position):
        line += text.count("\n", counted_to, position)
        counted_to = position
        lines.append(line)
        _, position = decoder.raw_decode(text, position)
        position = space.match(text, position).end()
        if text.startswith(",", position):
            position = space.match(text, position + 1).end()
    return lines


def _read_json(path: Path, split: str | None, on_error: str) -> _Records:
    text = _read_text(path)
    records = _Records()
    if not text.strip():
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}, line {error.lineno} column {error.colno}: not valid JSON ({error.msg}). Fix the file; "
            'in a JSONL file (one object per line) on_error="skip" can drop a bad line instead'
        ) from None
    if isinstance(data, list):
        lines = _json_list_lines(text)
        rows, where = data, [f"{path}, item {i + 1} (line {line})" for i, line in enumerate(lines)]
    else:
        keys = [key for key in (split, "data", "rows") if key is not None]
        key = next((k for k in keys if isinstance(data, dict) and isinstance(data.get(k), list)), None)
        if key is None:
            found = f"; its keys are {sorted(data)[:10]}" if isinstance(data, dict) else ""
            raise ValueError(
                f"{path}: expected a JSON list of records or an object with a list under {keys}{found}; "
                "set split to the key that holds the rows"
            )
        rows, where = data[key], [f"{path}, item {i + 1} of {key!r}" for i in range(len(data[key]))]
    for row, location in zip(rows, where):
        records.add(row, location, on_error)
    return records


def _read_jsonl(path: Path, on_error: str) -> _Records:
    records = _Records()
    for line_number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            records.reject(where, f"not valid JSON ({error.msg}, column {error.colno})", on_error)
            continue
        records.add(row, where, on_error)
    return records


def _read_csv(path: Path, on_error: str) -> _Records:
    records = _Records()
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            for row in reader:
                # line_num is the line where the row ends: its own line unless a quoted field spans lines
                records.add(dict(row), f"{path}, line {reader.line_num}", on_error)
        except csv.Error as error:
            raise ValueError(f"{path}, line {reader.line_num}: not valid CSV ({error}); fix the file") from None
    return records


def _import_datasets(what: str):
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"{what}, which needs the optional 'datasets' package: pip install 'cepo[hub]'"
        ) from error
    return datasets


def _dataset_rows(dataset: Any, split: str | None, display: str) -> _Records:
    """Rows of a `datasets` ``Dataset``, or of one split of a ``DatasetDict`` (any mapping of splits)."""
    if isinstance(dataset, Mapping):
        splits = list(dataset)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split is None:
            raise ValueError(f"{display} holds the splits {', '.join(splits)}; set split to one of them")
        if split not in dataset:
            raise ValueError(f"{display} has no split {split!r}; set split to one of {', '.join(splits)}")
        dataset, display = dataset[split], f"{display} [{split}]"
    records = _Records()
    for index, row in enumerate(dataset):
        records.add(dict(row), f"{display}, index {index}", "raise")
    return records


def _is_saved_dataset(folder: Path) -> bool:
    # save_to_disk writes state.json (a Dataset) or dataset_dict.json (a DatasetDict)
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _is_hub_layout(folder: Path) -> bool:
    # a clone or snapshot of a hub dataset repository: Parquet shards, or data files under data/
    return (folder / "data").is_dir() or next(folder.rglob("*.parquet"), None) is not None


def _read_folder(folder: Path, split: str | None, config_name: str | None, on_error: str) -> _Records:
    if _is_saved_dataset(folder):
        datasets = _import_datasets(f"{folder} is a dataset saved with save_to_disk")
        return _dataset_rows(datasets.load_from_disk(str(folder)), split, str(folder))
    files: dict[str, Path] = {}
    for suffix in _FOLDER_SUFFIXES:
        for candidate in sorted(folder.glob(f"*{suffix}")):
            files.setdefault(candidate.stem, candidate)
    if split is not None and split in files:
        return _read_file(files[split], split, on_error)
    if _is_hub_layout(folder):
        datasets = _import_datasets(f"{folder} is a hub-layout dataset folder")
        try:
            loaded = datasets.load_dataset(str(folder), config_name)
        except (ValueError, FileNotFoundError) as error:
            raise ValueError(f"{folder}: `datasets` could not read this folder ({error})") from error
        return _dataset_rows(loaded, split, str(folder))
    if split is None and len(files) == 1:
        (only, path), = files.items()
        return _read_file(path, only, on_error)
    if split is None:
        found = f"it holds the splits {', '.join(files)}; " if files else ""
        raise ValueError(f"{folder} is a folder; {found}set split (e.g. split='train') to pick a file in it")
    found = f" (it holds the splits {', '.join(files)})" if files else ""
    raise FileNotFoundError(
        f"no {split}.jsonl, {split}.json or {split}.csv in {folder}{found}, nor a dataset saved with "
        "save_to_disk or Parquet shards; set split to one of the files, or path to the folder that holds them"
    )


def _read_file(path: Path, split: str | None, on_error: str) -> _Records:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_json(path, split, on_error)
    if suffix == ".jsonl":
        return _read_jsonl(path, on_error)
    if suffix == ".csv":
        return _read_csv(path, on_error)
    if suffix == ".parquet":
        datasets = _import_datasets(f"{path} is a Parquet file")
        return _dataset_rows(datasets.load_dataset("parquet", data_files=str(path), split="train"), None, str(path))
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(_DATA_SUFFIXES)}")


def _truthy(value: Any) -> bool:
    return str(value).strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_offline(datasets: Any) -> bool:
    config = getattr(datasets, "config", None)
    return (
        _truthy(os.environ.get("HF_HUB_OFFLINE", "")) or _truthy(os.environ.get("HF_DATASETS_OFFLINE", ""))
        or getattr(config, "HF_HUB_OFFLINE", False) is True
    )


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants
    except ImportError:
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return constants.ENDPOINT


_LOCAL_COPY = (
    "or set path to a local copy: a folder written by save_to_disk, a .parquet file or a folder of Parquet "
    "shards, or a .jsonl/.json/.csv file"
)


def _hub_unreachable_reason(endpoint: str, timeout: float) -> str | None:
    """Why the hub at ``endpoint`` cannot be reached within ``timeout`` seconds, or None if it answered."""
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)  # it answered, with some status: the network is there
        except urllib.error.URLError as error:
            outcome.append(str(error.reason))
        except (OSError, http.client.HTTPException, ValueError) as error:
            outcome.append(f"{type(error).__name__}: {error}")

    # A thread bounds the whole probe, name resolution included (urlopen's timeout does not cover DNS).
    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def _read_hub(name: str, split: str | None, config_name: str | None) -> _Records:
    datasets = _import_datasets(
        f"{name!r} is not a local file, so it is loaded from the Hugging Face hub"
    )
    offline = _hub_offline(datasets)
    if not offline:
        # Without this check, datasets retries for ~25 s before failing when there is no network.
        endpoint = _hub_endpoint()
        reason = _hub_unreachable_reason(endpoint, HUB_PROBE_TIMEOUT_S)
        if reason is not None:
            raise ConnectionError(
                f"cannot reach the Hugging Face hub ({endpoint}) to load the dataset {name!r}: {reason}. "
                "Without network, set HF_HUB_OFFLINE=1 to read it from the local Hugging Face cache "
                f"(if it was downloaded before), {_LOCAL_COPY}"
            )
    try:
        dataset = datasets.load_dataset(name, config_name, split=split or "train")
    except (ConnectionError, FileNotFoundError) as error:
        if not offline:
            raise
        raise ConnectionError(
            f"the dataset {name!r} is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set so it "
            f"cannot be downloaded: unset HF_HUB_OFFLINE on a machine with network, {_LOCAL_COPY}"
        ) from error
    return _dataset_rows(dataset, None, f"{name} [{split or 'train'}]")


def _read(path_or_name: str, split: str | None, config_name: str | None, on_error: str) -> _Records:
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return _read_folder(path, split, config_name, on_error)
    if path.is_file():
        return _read_file(path, split, on_error)
    if _looks_like_path(path_or_name):
        raise FileNotFoundError(
            f"dataset file not found: {path_or_name} (relative paths start at the working directory "
            f"{Path.cwd()}); check the path"
        )
    return _read_hub(path_or_name, split, config_name)


def load_records(path_or_name: str, split: str | None = None, *, config_name: str | None = None) -> list[dict]:
    """Raw rows from a local file or folder, or a hub dataset name.

    Accepted: a ``.json`` file (a list of rows, or an object with the list under ``split``, ``"data"`` or
    ``"rows"``), ``.jsonl``, ``.csv``, ``.parquet``; a folder holding ``<split>.jsonl``/``.json``/``.csv``,
    a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``), or a hub-layout
    folder of Parquet shards (``data/train-00000-of-00001.parquet``, read with ``datasets.load_dataset``).
    In a folder ``split`` picks the split (optional when there is only one). Anything else is passed to
    ``datasets.load_dataset(path_or_name, config_name, split=split or "train")``; the formats other than
    JSON, JSONL and CSV need the optional ``datasets`` package. A missing local path (one with a file
    suffix, or a slash other than a hub ``owner/name``) raises ``FileNotFoundError``; a hub id with no
    network raises ``ConnectionError`` within :data:`HUB_PROBE_TIMEOUT_S` seconds. An unreadable row
    raises ``ValueError`` naming the file and line.
    """
    return _read(path_or_name, split, config_name, "raise").rows


# ----------------------------------------------------------------------------------------------------
# Rows and the adapter registry


def _field(row: Mapping[str, Any], name: str, defaults: Sequence[str], what: str, verbatim: bool = False) -> str:
    """The field's text, stripped (or as written with ``verbatim``); a missing, blank or non-text field is
    a row problem naming the field."""
    names = defaults if name == defaults[0] else (name,)
    for key in names:
        if key in row and row[key] is not None:
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise _RowProblem(f"field {key!r} ({what}) must be text, got {type(value).__name__}")
            text = str(value)
            if not text.strip():
                raise _RowProblem(f"empty {what} in field {key!r}")
            return text if verbatim else text.strip()
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

    def question(self, verbatim: bool = False) -> str:
        """The question, stripped; ``verbatim`` keeps its text as written (a raw prompt's trailing newline)."""
        return _field(self.fields, self.question_field, _QUESTION_ALIASES, "question", verbatim)

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
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        source = source or self.name
        examples: list[Example] = []
        skips: list[Skip] = []
        for index, record in enumerate(records):
            try:
                if not isinstance(record, Mapping):
                    raise _RowProblem(f"expected an object with fields, got {type(record).__name__}")
                examples.append(self.convert_row(Row(record, index, source, question_field, answer_field)))
            except _RowProblem as problem:
                location = where[index] if where is not None else f"{source}, record index {index}"
                if on_error == "raise":
                    raise ValueError(f"{location}: {problem} ({self.name} adapter). {_SKIP_HINT}.") from None
                skips.append((location, str(problem)))
        if self.after is not None:
            self.after(examples, source)
        return examples, skips

    def __call__(self, records: Sequence[Any], **options: Any) -> tuple[list[Example], int]:
        examples, skips = self.convert(records, **options)
        return examples, len(skips)

    def __repr__(self) -> str:
        return f"Adapter({self.name!r}, family={self.family!r})"


ADAPTERS: dict[str, Adapter] = {}
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
        if name in ADAPTERS:
            raise ValueError(f"a dataset adapter named {name!r} is already registered")
        adapter = Adapter(name, family, convert, after)
        ADAPTERS[name] = adapter
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
    """Any rows with a question and an answer field; alternatives are not split; kind ``auto``. The
    question is kept as written, so a ``raw`` prompt template gets it verbatim (trailing newline included;
    the other templates strip it)."""
    return row.example(row.question(verbatim=True), (row.answer(),), "auto")


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
        path_or_name: a local file or folder, or a hub dataset name (formats: :func:`load_records`).
        adapter: a key of :data:`ADAPTERS`.
        split: the split of a folder, a saved ``DatasetDict`` or a hub dataset (hub default ``"train"``).
        question_field: the row field holding the question.
        answer_field: the row field holding the answer.
        on_error: ``"raise"`` on an unreadable or malformed row, or ``"skip"`` to drop and count it.
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
    records = _read(path_or_name, split, config_name, on_error)
    if not records.rows and not records.skips:
        raise ValueError(
            f"{path_or_name} holds no rows (an empty file or split); point path at a file with rows, or pick "
            "another split"
        )
    examples, skips = ADAPTERS[adapter].convert(
        records.rows, source=source, on_error=on_error, question_field=question_field,
        answer_field=answer_field, where=records.where,
    )
    # unreadable rows were dropped before conversion; list every skip in file order
    all_skips = sorted(records.skips + skips, key=lambda skip: records.position.get(skip[0], 0))
    return LoadedDataset(sample_examples(examples, limit, seed), len(all_skips), source, all_skips)


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
