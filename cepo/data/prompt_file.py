"""Questions to answer with ``cepo predict``: a JSONL/JSON/CSV file, a plain-text file or stdin.

Unlike the benchmark adapters, a gold answer is optional here: rows without one are answered and
written without a correctness field.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from cepo.records import Example
from cepo.data.sources import DatasetSource

STDIN = "-"
_TEXT_SUFFIXES = (".txt", "")


class PromptFile(DatasetSource):
    """Questions read from ``path``: ``.jsonl``/``.json``/``.csv`` rows with a question field and an
    optional answer field, a ``.txt`` file with one question per line, or ``-`` for stdin (one JSON
    object or one plain-text question per line). Questions are used as written (a JSON question keeps its
    trailing newline, which some prompt formats need)."""

    def __init__(
        self,
        path: str = STDIN,
        question_field: str = "question",
        answer_field: str = "answer",
        answer_kind: Literal["auto", "number", "math", "yes_no", "choice", "text"] = "auto",
        limit: int | None = None,
        name: str | None = None,
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
        """
        super().__init__(name=name, limit=limit)
        self.path, self.question_field, self.answer_field = path, question_field, answer_field
        self.answer_kind = answer_kind

    def default_name(self) -> str:
        return "stdin" if self.path == STDIN else Path(self.path).stem

    def _load(self) -> list[Example]:
        rows = self._rows()
        return [self._example(row, index) for index, row in enumerate(rows)]

    def _rows(self) -> list[Any]:
        if self.path == STDIN:
            lines = [line for line in sys.stdin.read().splitlines() if line.strip()]
            return [_line_row(line, self.question_field, i) for i, line in enumerate(lines)]
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"PromptFile.path={self.path!r}: no such file; give a .jsonl/.json/.csv/.txt file or '-' for stdin")
        if path.suffix.lower() in _TEXT_SUFFIXES:
            return [{self.question_field: line} for line in path.read_text().splitlines() if line.strip()]
        from cepo.data.readers import load_records

        return load_records(str(path))

    def _example(self, row: Any, index: int) -> Example:
        where = f"{self.path}: row {index}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with a {self.question_field!r} field, got {type(row).__name__}")
        question = row.get(self.question_field)
        if not isinstance(question, str) or not question.strip():
            raise ValueError(
                f"{where}: no question in field {self.question_field!r} (fields: {sorted(row)}); set "
                "PromptFile.question_field to the field that holds it"
            )
        answer = row.get(self.answer_field)
        gold = () if answer is None or str(answer).strip() == "" else (str(answer).strip(),)
        row_id = row.get("id")
        return Example(
            question=question, gold=gold, answer_kind=self.answer_kind, source=self.name,
            id=str(row_id) if isinstance(row_id, (str, int)) else f"{self.name}-{index}", meta={"row": index},
        )


def _line_row(line: str, question_field: str, index: int) -> Any:
    """A stdin line: a JSON object when it starts with ``{``, otherwise the question itself."""
    text = line.strip()
    if not text.startswith("{"):
        return {question_field: text}
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"stdin line {index + 1} starts with '{{' but is not valid JSON: {err}") from None
