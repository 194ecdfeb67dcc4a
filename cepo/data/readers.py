"""Raw records from local files, ``datasets`` folders or a Hugging Face hub dataset, before any adapter.

:func:`load_records` reads JSON (a list, or a dict of splits), JSONL, CSV and Parquet files, plain folders
of ``<split>.<suffix>`` files, folders written by ``datasets.save_to_disk``, hub-layout snapshots and hub
dataset ids. A row that cannot be read (a JSONL line that is not JSON, bytes that are not UTF-8) raises
``ValueError`` naming the file and the line (1-based, as an editor shows it), or with ``on_error="skip"``
is dropped and recorded with its location and reason.
"""

from __future__ import annotations

import csv
import http.client
import json
import os
import re
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

ON_ERROR = ("raise", "skip")
ON_ERROR_FIX = ("use on_error='skip' to drop malformed rows (each named in a warning and counted as `skipped`), "
                "or 'raise' to stop at the first")
_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
_FOLDER_SUFFIXES = (".jsonl", ".json", ".csv")  # <split><suffix> in a plain folder, in this order of preference
SKIP_HINT = (
    'Fix the data, or set on_error="skip" (on_error: skip in a FileDataset or PromptFile config) to drop '
    "such rows; they are counted as skipped"
)
# Seconds to wait for the hub before a dataset id is declared unreachable (DNS included).
HUB_PROBE_TIMEOUT_S = 5.0

Skip = tuple[str, str]  # (where: "data/x.jsonl, line 7", why: "missing answer field 'answer'")


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
            raise ValueError(f"{where}: {why}. {SKIP_HINT}.")
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


def read_rows(path: str, *, on_error: str = "raise") -> tuple[list[Any], list[str], list[Skip]]:
    """The readable rows of a local data file, where each one is (``"<path>, line 7"``, for messages) and
    the ``(where, why)`` of each row dropped as unreadable under ``on_error="skip"``."""
    records = _read(path, None, None, on_error)
    return records.rows, records.where, records.skips


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
