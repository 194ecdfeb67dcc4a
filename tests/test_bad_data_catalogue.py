"""Catalogue of bad data input: each case must fail with a message that names the problem and the fix.

One row per case: how to build the bad input (in ``tmp_path``), the exception, a pattern for the problem
(with the file and 1-based line where there is one) and a pattern for the fix. Below the table, the same
unreadable rows under ``on_error="skip"``: dropped, counted, and listed with where and why.
"""

import json
import re
import sys

import pytest

from cepo.data.datasets import load_examples, load_records
from cepo.data.prompt_file import PromptFile
from cepo.data.sources import FileDataset

SKIP_FIX = r'on_error="skip"'


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def jsonl(*rows):
    return "".join(json.dumps(row) + "\n" for row in rows)


GOOD = {"question": "What is 2+2?", "answer": "4"}


def load(name, content, adapter="generic", **options):
    return lambda tmp_path, monkeypatch: load_examples(write(tmp_path, name, content), adapter, **options)


def prompt_file(name, content, **options):
    return lambda tmp_path, monkeypatch: PromptFile(write(tmp_path, name, content), **options).load()


def folder_with(names, **options):
    def run(tmp_path, monkeypatch):
        folder = tmp_path / "folder"
        folder.mkdir()
        for name in names:
            write(folder, name, jsonl(GOOD))
        return load_examples(str(folder), **options)

    return run


def without_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the optional package were not installed
    return load_records("openai/gsm8k", "test", config_name="main")


def all_rows_skipped(tmp_path, monkeypatch):
    path = write(tmp_path, "x.jsonl", jsonl({"q": "a"}, {"q": "b"}))
    with pytest.warns(UserWarning, match="skipped 2 malformed rows"):
        return FileDataset(path, on_error="skip").load()


CASES = [
    # (id, build-and-load, exception, problem, fix)
    ("missing answer field", load("x.jsonl", jsonl(GOOD, {"question": "q"})), ValueError,
     r"x\.jsonl, line 2: missing answer field 'answer'", SKIP_FIX),
    ("renamed question column", load("x.jsonl", jsonl({"prompt": "q", "answer": "1"})), ValueError,
     r"x\.jsonl, line 1: missing question field 'question'", SKIP_FIX),
    ("empty question", load("x.jsonl", jsonl(GOOD, GOOD, {"question": " ", "answer": "1"})), ValueError,
     r"x\.jsonl, line 3: empty question in field 'question'", SKIP_FIX),
    ("row not an object", load("x.jsonl", jsonl(GOOD, [1, 2])), ValueError,
     r"x\.jsonl, line 2: expected an object with fields, got list", SKIP_FIX),
    ("field of the wrong type", load("x.jsonl", jsonl({"question": {"a": 1}, "answer": "1"})), ValueError,
     r"line 1: field 'question' \(question\) must be text, got dict", SKIP_FIX),
    ("gold that cannot be parsed", load("gsm.jsonl", jsonl({"question": "q", "answer": "42"}), "gsm8k"),
     ValueError, r"gsm\.jsonl, line 1: answer has no '#### <number>' final line \(gsm8k adapter\)", SKIP_FIX),
    ("blank lines keep line numbers", load("x.jsonl", "\n" + jsonl(GOOD) + "\n" + jsonl({"answer": "1"})),
     ValueError, r"x\.jsonl, line 4: missing question", SKIP_FIX),
    ("invalid JSON line", load("x.jsonl", jsonl(GOOD) + "{'question': 'q'}\n"), ValueError,
     r"x\.jsonl, line 2: not valid JSON", SKIP_FIX),
    ("non-UTF-8 byte in JSONL",
     load("x.jsonl", jsonl(GOOD, GOOD).encode() + b'{"question": "caf\xe9", "answer": "1"}\n'), ValueError,
     r"x\.jsonl, line 3: byte 0xe9 in field 'question' is not valid UTF-8", r"save the file as UTF-8"),
    ("non-UTF-8 byte in CSV", load("x.csv", b"question,answer\nok,1\nbad \xff,2\n"), ValueError,
     r"x\.csv, line 3: byte 0xff in field 'question' is not valid UTF-8", r"save the file as UTF-8"),
    ("non-UTF-8 byte in JSON",
     load("x.json", b'[\n {"question": "q", "answer": "1"},\n {"question": "q", "answer": "\x80"}\n]'), ValueError,
     r"x\.json, item 2 \(line 3\): byte 0x80 in field 'answer' is not valid UTF-8", r"save the file"),
    ("JSON row numbers are items", load("x.json", json.dumps([GOOD, GOOD, {"question": "q"}])), ValueError,
     r"x\.json, item 3 \(line 1\): missing answer field", SKIP_FIX),
    ("JSON syntax error", load("x.json", '[\n {"question": "q", "answer": "1"},\n {"question": "q",}\n]'),
     ValueError, r"x\.json, line 3 column \d+: not valid JSON", r"Fix the file"),
    ("JSON object without a row list", load("x.json", json.dumps({"meta": 1, "items": [GOOD]})), ValueError,
     r"expected a JSON list of records or an object with a list under \['data', 'rows'\]; its keys are "
     r"\['items', 'meta'\]", r"set split to the key"),
    ("empty JSONL file", load("x.jsonl", ""), ValueError, r"x\.jsonl holds no rows", r"point path at a file"),
    ("empty JSON file", load("x.json", "  \n"), ValueError, r"x\.json holds no rows", r"point path at a file"),
    ("CSV with a header only", load("x.csv", "question,answer\n"), ValueError, r"x\.csv holds no rows",
     r"point path at a file"),
    ("every row skipped", all_rows_skipped, ValueError,
     r"every row of .*x\.jsonl was skipped \(2\); the first: .*line 1: missing question", r"Check the adapter"),
    ("missing file", lambda tmp_path, monkeypatch: load_examples(str(tmp_path / "nope.jsonl")), FileNotFoundError,
     r"dataset file not found: .*nope\.jsonl", r"check the path"),
    ("missing relative path", lambda tmp_path, monkeypatch: load_examples("./data/nope"), FileNotFoundError,
     r"dataset file not found: \./data/nope", r"relative paths start at the working directory"),
    ("unsupported file type", load("x.txt", "q"), ValueError, r"unsupported file type '\.txt'",
     r"use one of \.json, \.jsonl, \.csv, \.parquet"),
    ("unknown split in a folder", folder_with(["train.jsonl", "validation.jsonl"], split="test"),
     FileNotFoundError, r"no test\.jsonl, test\.json or test\.csv in .*folder \(it holds the splits train, "
     r"validation\)", r"set split to one of the files"),
    ("folder with several splits, none chosen", folder_with(["train.jsonl", "test.jsonl"]), ValueError,
     r"folder is a folder; it holds the splits test, train", r"set split"),
    ("unknown adapter", load("x.jsonl", jsonl(GOOD), "gsm9k"), ValueError, r"unknown dataset adapter 'gsm9k'",
     r"choose one of generic, gsm8k, math"),
    ("unknown on_error", load("x.jsonl", jsonl(GOOD), on_error="ignore"), ValueError,
     r"on_error must be 'raise' or 'skip', got 'ignore'", r"use on_error='skip' to drop malformed rows"),
    ("negative limit", load("x.jsonl", jsonl(GOOD, GOOD), limit=-1), ValueError, r"limit must be >= 0, got -1",
     r"set it to the number of examples to keep, or to null"),
    ("gold that can never match", load("x.jsonl", jsonl(GOOD, {"question": "q", "answer": "???"}), "math"),
     ValueError, r"x\.jsonl, line 2: gold answer '\?\?\?' holds no digit, letter", SKIP_FIX),
    ("PromptFile: empty question", prompt_file("q.jsonl", jsonl({"question": "a"}, {"question": " "})), ValueError,
     r"q\.jsonl, line 2: empty question in field 'question'", SKIP_FIX),
    ("PromptFile: question not text", prompt_file("q.jsonl", jsonl({"question": 3})), ValueError,
     r"q\.jsonl, line 1: field 'question' \(question\) must be text, got int", SKIP_FIX),
    ("PromptFile: a folder", lambda tmp_path, monkeypatch: PromptFile(str(tmp_path)).load(), IsADirectoryError,
     r"PromptFile\.path='.*' is a folder", r"give a \.jsonl/\.json/\.csv/\.txt file in it"),
    ("hub name without datasets", without_datasets, ImportError, r"'openai/gsm8k' is not a local file",
     r"pip install 'cepo\[hub\]'"),
]


@pytest.mark.parametrize("build, error, problem, fix", [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_bad_data_is_refused_naming_problem_and_fix(tmp_path, monkeypatch, build, error, problem, fix):
    with pytest.raises(error) as raised:
        build(tmp_path, monkeypatch)
    message = str(raised.value)
    found = re.search(problem, message)
    assert found, message
    # The fix must be said besides the problem: a fix pattern that the problem's own words match proves nothing.
    assert re.search(fix, message[:found.start()] + " " + message[found.end():]), message


# ---------------------------------------------------------------------------------------------------
# the same unreadable rows with on_error="skip": dropped, counted, listed in file order


def test_unreadable_and_malformed_rows_are_skipped_and_counted_in_file_order(tmp_path):
    content = (
        jsonl({"question": "one", "answer": "1"}).encode()
        + b"{not json}\n"
        + b'{"question": "caf\xe9", "answer": "3"}\n'
        + jsonl({"question": "four"}, {"question": "five", "answer": "5"}).encode()
    )
    path = write(tmp_path, "mixed.jsonl", content)
    loaded = load_examples(path, on_error="skip")
    assert [e.question for e in loaded.examples] == ["one", "five"]
    assert [e.meta["row"] for e in loaded.examples] == [0, 2]  # index among the readable rows
    assert loaded.skipped == 3
    assert [where for where, _ in loaded.skips] == [f"{path}, line {n}" for n in (2, 3, 4)]
    whys = [why for _, why in loaded.skips]
    assert whys[0].startswith("not valid JSON") and "0xe9" in whys[1] and "missing answer" in whys[2]


def test_non_utf8_csv_and_json_rows_are_skipped_with_their_lines(tmp_path):
    csv_path = write(tmp_path, "x.csv", b"question,answer\nok,1\nbad \xff,2\nfine,3\n")
    loaded = load_examples(csv_path, on_error="skip")
    assert [e.gold for e in loaded.examples] == [("1",), ("3",)]
    assert loaded.skips == [(f"{csv_path}, line 3", "byte 0xff in field 'question' is not valid UTF-8; "
                                                    "save the file as UTF-8")]
    json_path = write(tmp_path, "x.json", b'[{"question": "a", "answer": "1"},\n{"question": "b\xc3", "answer": "2"}]')
    loaded = load_examples(json_path, on_error="skip")
    assert [e.question for e in loaded.examples] == ["a"]
    assert loaded.skips[0][0] == f"{json_path}, item 2 (line 2)"


def test_skipped_rows_are_named_in_the_warning(tmp_path):
    path = write(tmp_path, "x.jsonl", jsonl(GOOD, {"question": "q"}, GOOD) + "oops\n")
    source = FileDataset(path, on_error="skip")
    with pytest.warns(UserWarning, match=r"skipped 2 malformed rows of .*: .*line 2: missing answer field 'answer'; "
                                         r".*line 4: not valid JSON"):
        examples = source.load()
    assert len(examples) == 2 and source.skipped == 2


def test_valid_utf8_and_a_byte_order_mark_load_unchanged(tmp_path):
    rows = [{"question": "Café — naïve? ∑", "answer": "日本"}, {"question": "q\u2028two lines", "answer": "1"}]
    text = "\ufeff" + "".join(json.dumps(row, ensure_ascii=False) + "\r\n" for row in rows)
    path = write(tmp_path, "x.jsonl", text)
    assert load_records(path) == rows
