"""Questions to answer with ``cepo predict``: a JSONL/JSON/CSV file, a plain-text file or stdin.

Unlike the benchmark adapters, a gold answer is optional here: rows without one are answered and
written without a correctness field.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from cepo.data.adapters import RowProblem, checked_gold
from cepo.data.readers import ON_ERROR, SKIP_HINT, Skip, read_rows
from cepo.data.sources import DatasetSource, report_skips
from cepo.records import Example

STDIN = "-"
_TEXT_SUFFIXES = (".txt", "")


class PromptFile(DatasetSource):
    """Questions read from ``path``: ``.jsonl``/``.json``/``.csv`` rows with a question field and an
    optional answer field, a ``.txt`` file with one question per line, or ``-`` for stdin (one JSON
    object or one plain-text question per line). Questions are used as written (a JSON question keeps its
    trailing newline, which some prompt formats need). Problems name the file and its 1-based line."""

    def __init__(
        self,
        path: str = STDIN,
        question_field: str = "question",
        answer_field: str = "answer",
        answer_kind: Literal["auto", "number", "math", "yes_no", "choice", "text"] = "auto",
        limit: int | None = None,
        name: str | None = None,
        on_error: Literal["raise", "skip"] = "raise",
    ) -> None:
        """
        Args:
            path: A ``.jsonl``, ``.json``, ``.csv`` or ``.txt`` file, or ``-`` to read stdin.
            question_field: Field holding the question in JSON/CSV rows.
            answer_field: Field holding the gold answer, if any (rows without it get no correctness).
            answer_kind: Matching rule for the gold answers (``auto``, ``number``, ``math``, ``yes_no``,
                ``choice`` or ``text``).
            limit: Keep only the first ``limit`` questions.
            name: Name in the output (default: the file stem, or ``stdin``).
            on_error: ``raise`` on an unreadable or malformed row (the error names file and line) or
                ``skip`` it and count it (a warning naming the first rows and why).
        """
        super().__init__(name=name, limit=limit)
        if on_error not in ON_ERROR:
            raise ValueError(f"PromptFile.on_error must be 'raise' or 'skip', got {on_error!r}")
        self.path, self.question_field, self.answer_field = path, question_field, answer_field
        self.answer_kind, self.on_error = answer_kind, on_error

    def default_name(self) -> str:
        return "stdin" if self.path == STDIN else Path(self.path).stem

    def _load(self) -> list[Example]:
        rows, where, skips = self._rows()
        examples = []
        for index, (row, location) in enumerate(zip(rows, where)):
            try:
                examples.append(checked_gold(self._example(row, index)))
            except RowProblem as problem:
                if self.on_error == "raise":
                    raise ValueError(f"{location}: {problem}. {SKIP_HINT}.") from None
                skips.append((location, str(problem)))
        report_skips(self, skips, examples)
        return examples

    def _rows(self) -> tuple[list[Any], list[str], list[Skip]]:
        if self.path == STDIN:
            lines = list(enumerate(sys.stdin.read().splitlines(), start=1))
            rows, where, skips = [], [], []
            for number, line in lines:
                if not line.strip():
                    continue
                try:
                    rows.append(_line_row(line, self.question_field))
                    where.append(f"stdin, line {number}")
                except ValueError as err:
                    if self.on_error == "raise":
                        raise ValueError(f"stdin line {number} {err}") from None
                    skips.append((f"stdin, line {number}", str(err)))
            return rows, where, skips
        path = Path(self.path).expanduser()
        if path.is_dir():
            raise IsADirectoryError(f"PromptFile.path={self.path!r} is a folder; give a .jsonl/.json/.csv/.txt "
                                    "file in it, or '-' for stdin")
        if not path.is_file():
            raise FileNotFoundError(f"PromptFile.path={self.path!r}: no such file; give a .jsonl/.json/.csv/.txt file or '-' for stdin")
        if path.suffix.lower() in _TEXT_SUFFIXES:
            numbered = [(n, line) for n, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
            return ([{self.question_field: line} for _, line in numbered], [f"{self.path}, line {n}" for n, _ in numbered],
                    [])
        return read_rows(str(path), on_error=self.on_error)

    def _example(self, row: Any, index: int) -> Example:
        if not isinstance(row, dict):
            raise RowProblem(f"expected an object with a {self.question_field!r} field, got {type(row).__name__}")
        if row.get(self.question_field) is None:
            raise RowProblem(f"missing question field {self.question_field!r} (fields: {sorted(row)}); set "
                             "PromptFile.question_field to the field that holds it")
        question = row[self.question_field]
        if not isinstance(question, str):
            raise RowProblem(f"field {self.question_field!r} (question) must be text, got {type(question).__name__}")
        if not question.strip():
            raise RowProblem(f"empty question in field {self.question_field!r}")
        answer = row.get(self.answer_field)
        gold = () if answer is None or str(answer).strip() == "" else (str(answer).strip(),)
        row_id = row.get("id")
        return Example(
            question=question, gold=gold, answer_kind=self.answer_kind, source=self.name,
            id=str(row_id) if isinstance(row_id, (str, int)) else f"{self.name}-{index}", meta={"row": index},
        )


def _line_row(line: str, question_field: str) -> Any:
    """A stdin line: a JSON object when it starts with ``{``, otherwise the question itself."""
    text = line.strip()
    if not text.startswith("{"):
        return {question_field: text}
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"starts with '{{' but is not valid JSON: {err}") from None
