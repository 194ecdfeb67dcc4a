"""Evaluation end to end through the CLI: file datasets in real formats, the results table, the
per-dataset metrics and results file, and how bad data is reported."""

import json
import logging
from pathlib import Path

import pytest

from cepo.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
METRIC_KEYS = {"n", "accuracy", "format_rate", "truncation_rate", "mean_length"}

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "He has 3+4=<<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 12 pens. Ann takes 5. How many pens are left?",
     "answer": "12-5=<<12-5=7>>7 pens are left.\n#### 7"},
    {"question": "Sam reads 2 books a week for 3 weeks. How many books does he read?",
     "answer": "2*3=<<2*3=6>>6\n#### 6"},
]
CONTEXT = ("Imagine a self-contained world with only these conditions: Smoking has a direct effect on tar. "
           "Tar has a direct effect on cancer.")
CLADDER_ROWS = [
    # Same context, opposite wording: a correlation-vs-causation pair.
    {"question": f"{CONTEXT} Question: Is the chance of cancer larger when observing smoking?", "answer": "yes"},
    {"question": f"{CONTEXT} Question: Is the chance of cancer smaller when observing smoking?", "answer": "no"},
    {"question": f"{CONTEXT} Question: Will smoking increase the chance of cancer?", "answer": "yes"},
]


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def write_json(path: Path, rows) -> str:
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return str(path)


def file_source(path: str, adapter: str, name: str, **extra) -> dict:
    return {"class_path": "cepo.FileDataset", "init_args": {"path": path, "adapter": adapter, "name": name, **extra}}


def eval_args(tmp_path: Path, stage: str, sources: list[dict]) -> list[str]:
    return [
        "--config", QUICKSTART,
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--data.eval_batch_size", "2",  # several batches per dataset, so metrics accumulate
        "--model.init_args.generation.max_new_tokens", "8",
        f"--data.{stage}", json.dumps(sources),
    ]


@pytest.fixture()
def two_datasets(tmp_path):
    return [
        file_source(write_jsonl(tmp_path / "gsm8k_mini.jsonl", GSM8K_ROWS), "gsm8k", "gsm8k_mini"),
        file_source(write_json(tmp_path / "cladder_mini.json", CLADDER_ROWS), "cladder", "cladder_mini"),
    ]


@pytest.fixture()
def table_log(caplog):
    """Capture what rank_zero_info writes (through the ``lightning.pytorch`` logger)."""
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    yield caplog
    logger.removeHandler(caplog.handler)


def read_results(log_dir: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (log_dir / f"{stage}_results.jsonl").read_text().splitlines()]


def check_results(cli, stage: str, log_text: str) -> None:
    assert f"{stage} results" in log_text
    table = log_text[log_text.index(f"{stage} results"):]
    assert "gsm8k_mini" in table and "cladder_mini" in table and "accuracy" in table
    rows = read_results(Path(cli.trainer.log_dir), stage)
    assert [row["dataset"] for row in rows] == ["gsm8k_mini", "cladder_mini"]
    by_name = {row["dataset"]: row for row in rows}
    for row in rows:
        assert row["stage"] == stage
        assert METRIC_KEYS <= row.keys()
        assert 0.0 <= row["accuracy"] <= 1.0
    assert by_name["gsm8k_mini"]["n"] == len(GSM8K_ROWS)
    assert by_name["cladder_mini"]["n"] == len(CLADDER_ROWS)
    # CLadder's correlation question and its opposite-wording pair are measured; GSM8K has neither.
    assert {"correlation_accuracy", "pair_consistency"} <= by_name["cladder_mini"].keys()
    assert "pair_consistency" not in by_name["gsm8k_mini"]
    metrics = cli.trainer.callback_metrics
    for name in ("gsm8k_mini", "cladder_mini"):
        assert float(metrics[f"{stage}/{name}/accuracy"]) == pytest.approx(by_name[name]["accuracy"])
        assert float(metrics[f"{stage}/{name}/n"]) == by_name[name]["n"]
    assert f"{stage}/accuracy" in metrics


@pytest.mark.slow
def test_validate_two_file_datasets(tmp_path, two_datasets, table_log):
    cli = main(["validate", *eval_args(tmp_path, "val", two_datasets)])
    check_results(cli, "val", table_log.text)


@pytest.mark.slow
def test_test_two_file_datasets(tmp_path, two_datasets, table_log):
    cli = main(["test", *eval_args(tmp_path, "test", two_datasets)])
    check_results(cli, "test", table_log.text)


def malformed_gsm8k(tmp_path: Path) -> str:
    rows = [GSM8K_ROWS[0], {"question": "How many?", "answer": "There are 5."}, GSM8K_ROWS[2]]
    return write_jsonl(tmp_path / "broken_gsm8k.jsonl", rows)


@pytest.mark.slow
def test_malformed_row_raises_naming_file_and_row(tmp_path):
    sources = [file_source(malformed_gsm8k(tmp_path), "gsm8k", "broken")]
    with pytest.raises(ValueError, match=r"broken_gsm8k\.jsonl, line 2: ") as error:  # the file's own line number
        main(["validate", *eval_args(tmp_path, "val", sources)])
    assert "broken_gsm8k.jsonl" in str(error.value)
    assert "####" in str(error.value)


@pytest.mark.slow
def test_malformed_row_is_skipped_and_counted(tmp_path):
    sources = [file_source(malformed_gsm8k(tmp_path), "gsm8k", "broken", on_error="skip")]
    with pytest.warns(UserWarning, match="skipped 1 malformed rows"):
        cli = main(["validate", *eval_args(tmp_path, "val", sources)])
    assert cli.datamodule.val_sources[0].skipped == 1
    (row,) = read_results(Path(cli.trainer.log_dir), "val")
    assert row["dataset"] == "broken" and row["n"] == 2
    assert row["skipped"] == 1, "the results name the rows that were dropped (README: `skipped`)"
    assert cli.trainer.callback_metrics["val/broken/skipped"] == 1


@pytest.mark.slow
def test_missing_data_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "data" / "nowhere.jsonl"
    sources = [file_source(str(missing), "gsm8k", "gone")]
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        main(["validate", *eval_args(tmp_path, "val", sources)])
