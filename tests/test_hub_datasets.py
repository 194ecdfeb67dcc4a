"""Datasets in the formats of the Hugging Face ecosystem, read offline from data the tests write.

Each format must give exactly the examples that the same rows give as a JSONL file. ``datasets`` is an
optional dependency of cepo (``cepo[hub]``) and part of the ``test`` extra, so these run in CI.
"""

import json
import socket
import sys
import time

import datasets
import huggingface_hub.constants
import pytest

import cepo.data.readers as readers_module
from cepo.data.datasets import load_examples, load_records
from cepo.data.sources import FileDataset

TRAIN = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 1,200 pens; 200 are sold. How many are left?", "answer": "#### 1,000"},
    {"question": "Twice 21?", "answer": "#### 42"},
]
TEST = [{"question": "Half of 10?", "answer": "#### 5"}, {"question": "9 minus 4?", "answer": "#### 5"}]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    # load_dataset writes an Arrow cache; keep it inside the test's folder
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def reference(tmp_path, rows, name):
    """The examples the rows give as a JSONL file, with the source name the other format will use."""
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return load_examples(str(path), "gsm8k").examples


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(TRAIN).save_to_disk(str(tmp_path / "saved"))
    assert load_examples(str(tmp_path / "saved"), "gsm8k").examples == reference(tmp_path, TRAIN, "train")
    assert load_records(str(tmp_path / "saved"), split="ignored for one Dataset") == TRAIN

    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(TRAIN),
                                 "test": datasets.Dataset.from_list(TEST)})
    both.save_to_disk(str(tmp_path / "saved_dict"))
    test = load_examples(str(tmp_path / "saved_dict"), "gsm8k", split="test").examples
    assert test == reference(tmp_path, TEST, "test")
    assert [e.gold for e in test] == [("5",), ("5",)]
    with pytest.raises(ValueError, match=r"saved_dict holds the splits train, test; set split to one of them"):
        load_records(str(tmp_path / "saved_dict"))
    with pytest.raises(ValueError, match=r"saved_dict has no split 'validation'; set split to one of train, test"):
        load_records(str(tmp_path / "saved_dict"), split="validation")


def test_parquet_file(tmp_path):
    datasets.Dataset.from_list(TRAIN).to_parquet(str(tmp_path / "gsm.parquet"))
    assert load_examples(str(tmp_path / "gsm.parquet"), "gsm8k").examples == reference(tmp_path, TRAIN, "gsm")


def test_hub_layout_folder_of_parquet_shards(tmp_path):
    repo = tmp_path / "gsm8k-snapshot"
    (repo / "data").mkdir(parents=True)
    datasets.Dataset.from_list(TRAIN[:2]).to_parquet(str(repo / "data" / "train-00000-of-00002.parquet"))
    datasets.Dataset.from_list(TRAIN[2:]).to_parquet(str(repo / "data" / "train-00001-of-00002.parquet"))
    datasets.Dataset.from_list(TEST).to_parquet(str(repo / "data" / "test-00000-of-00001.parquet"))
    assert load_records(str(repo), split="train") == TRAIN  # shards in order
    source = FileDataset(str(repo), adapter="gsm8k", split="test")
    assert source.load() == reference(tmp_path, TEST, "test") and source.name == "gsm8k-snapshot"
    with pytest.raises(ValueError, match=r"has no split 'validation'; set split to one of"):
        load_records(str(repo), split="validation")


def test_hub_snapshot_with_configurations(tmp_path):
    # the layout of openai/gsm8k: one folder per configuration, declared in the README's YAML header
    repo = tmp_path / "snapshot"
    for config, rows in (("main", TEST), ("socratic", TRAIN)):
        (repo / config).mkdir(parents=True)
        datasets.Dataset.from_list(rows).to_parquet(str(repo / config / "test-00000-of-00001.parquet"))
    header = "".join(f"- config_name: {c}\n  data_files:\n  - split: test\n    path: {c}/test-*\n"
                     for c in ("main", "socratic"))
    (repo / "README.md").write_text(f"---\nconfigs:\n{header}---\n", encoding="utf-8")
    assert load_records(str(repo), "test", config_name="main") == TEST
    assert load_records(str(repo), "test", config_name="socratic") == TRAIN


def test_a_row_of_a_hub_format_is_named_by_its_index(tmp_path):
    rows = [*TEST, {"question": "no marker", "answer": "5"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(ValueError, match=r"t\.parquet, index 2: answer has no '#### <number>'"):
        load_examples(str(tmp_path / "t.parquet"), "gsm8k")
    loaded = load_examples(str(tmp_path / "t.parquet"), "gsm8k", on_error="skip")
    assert loaded.skipped == 1 and len(loaded) == 2


def test_formats_that_need_datasets_say_how_to_install_it(tmp_path, monkeypatch):
    datasets.Dataset.from_list(TRAIN).to_parquet(str(tmp_path / "gsm.parquet"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"gsm\.parquet is a Parquet file, which needs the optional 'datasets' "
                                          r"package: pip install 'cepo\[hub\]'"):
        load_records(str(tmp_path / "gsm.parquet"))


# ---------------------------------------------------------------------------------------------------
# hub ids without network: a fast, clear failure


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # free once closed, so a connection to it is refused


def refuse_download(*args, **kwargs):
    raise AssertionError("load_dataset must not be called when the hub cannot be reached")


@pytest.mark.parametrize("endpoint, timeout", [
    ("http://127.0.0.1:{port}", 5.0),  # nothing listens: refused at once
    ("http://192.0.2.1", 0.5),  # TEST-NET-1, never routed: silence until the probe's timeout
])
def test_unreachable_hub_fails_fast_naming_the_offline_fixes(monkeypatch, endpoint, timeout):
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint.format(port=closed_port()))
    monkeypatch.setattr(readers_module, "HUB_PROBE_TIMEOUT_S", timeout)
    monkeypatch.setattr(datasets, "load_dataset", refuse_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    with pytest.raises(ConnectionError) as raised:
        load_examples("openai/gsm8k", "gsm8k", split="test", config_name="main")
    assert time.monotonic() - start < timeout + 2.0
    message = str(raised.value)
    assert "cannot reach the Hugging Face hub" in message and "'openai/gsm8k'" in message
    assert "HF_HUB_OFFLINE=1" in message and "save_to_disk" in message and ".parquet" in message


def test_hub_id_in_offline_mode_not_cached_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=r"'nobody/no-such-dataset' is not in the local Hugging Face cache, "
                                              r"and HF_HUB_OFFLINE is set.*local copy"):
        load_records("nobody/no-such-dataset", "test")
    assert time.monotonic() - start < 10.0


def test_hub_id_never_waits_for_retries(monkeypatch):
    # Whatever the network here: no network fails within the probe's bound; with network the call
    # reaches load_dataset (replaced, so nothing is downloaded).
    reached = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: reached.append(args) or [])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    try:
        load_records("openai/gsm8k", "test", config_name="main")
    except ConnectionError as error:
        assert "HF_HUB_OFFLINE=1" in str(error)
    else:
        assert reached == [("openai/gsm8k", "main")]
    assert time.monotonic() - start < readers_module.HUB_PROBE_TIMEOUT_S + 2.0
