"""Datasets as examples: read the raw records (:mod:`cepo.data.readers`), convert them with a registered
adapter (:mod:`cepo.data.adapters`), sample and split them. :func:`load_examples` is the usual entry point;
:func:`paper_training_mix` builds the CE-PO authors' training mixture.

Every name of the readers and the adapters is importable from here as well (``from cepo.data.datasets
import ADAPTERS, register_adapter, load_records``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

from cepo.data.adapters import (
    ADAPTERS,
    FAMILY_BY_ADAPTER,
    Adapter,
    Row,
    bbeh_arithmetic_adapter,
    bbeh_causal_adapter,
    casehold_adapter,
    cladder_adapter,
    cladder_query_type,
    generic_adapter,
    gsm8k_adapter,
    ifqa_adapter,
    legalbench_causality_adapter,
    logiqa_adapter,
    math_adapter,
    register_adapter,
    reject,
)
from cepo.data.readers import ON_ERROR, ON_ERROR_FIX, Skip, _read, load_records
from cepo.records import Example

__all__ = [
    "ADAPTERS", "FAMILY_BY_ADAPTER", "PAPER_EVAL_FILES", "PAPER_TRAIN_FILES", "Adapter", "LoadedDataset", "Row",
    "bbeh_arithmetic_adapter", "bbeh_causal_adapter", "casehold_adapter", "cladder_adapter", "cladder_query_type",
    "find_data_file", "generic_adapter", "gsm8k_adapter", "ifqa_adapter", "legalbench_causality_adapter",
    "load_examples", "load_records", "logiqa_adapter", "math_adapter", "paper_training_mix", "register_adapter",
    "reject", "sample_examples", "split_train_val",
]

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


# ----------------------------------------------------------------------------------------------------
# Entry points


def sample_examples(examples: Sequence[Example], limit: int | None, seed: int = 42) -> list[Example]:
    """Up to ``limit`` examples drawn without replacement with ``seed``, kept in their original order."""
    if limit is None or limit >= len(examples):
        return list(examples)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}; set it to the number of examples to keep, or to "
                         "null to keep them all")
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
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}: {ON_ERROR_FIX}")
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
