"""Every Lightning logger gets the run's rich outputs through its own API, end to end: a two-step run with
the CSV logger, W&B (offline), MLflow (a local file store) and two loggers at once, each read back from
what landed on disk: the completions table's rows, the hyperparameters and the final metrics. The
TensorBoard path is covered in test_rl_training.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cepo.cli import main
from helpers import runs

pytestmark = pytest.mark.slow
GROUP = 4  # small_run_args: 4 prompts x 4 samples; the table logs the first 4 rows, one prompt's group


@pytest.fixture(autouse=True)
def cli_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cepo"])  # the CLI reads args=..., not pytest's own command line


def fit(tmp_path: Path, logger: object) -> object:
    args = runs.small_run_args(tmp_path, "--trainer.logger", json.dumps(logger))
    return main(["fit", *args])


def check_rows(rows: list[dict], steps: list[int]) -> None:
    """The table holds the first prompt's group at each logged step: accuracy-only GRPO, so the fused
    reward equals the accuracy, and the group's z-scored advantages sum to 0."""
    assert [row["step"] for row in rows] == [step for step in steps for _ in range(GROUP)]
    for step in steps:
        group = [row for row in rows if row["step"] == step]
        assert len({row["prompt"] for row in group}) == 1
        assert all(row["reward"] == row["accuracy"] and row["accuracy"] in (0.0, 1.0) for row in group)
        assert abs(sum(row["advantage"] for row in group)) < 1e-3
        assert all(row["completion"] and "gold" in row for row in group)


def check_final(cli, metrics: dict[str, float]) -> None:
    expected = float(cli.trainer.callback_metrics["val/accuracy"])
    assert float(metrics["final/val/accuracy"]) == pytest.approx(expected)


def test_csv_logger_gets_table_hyperparameters_and_final_metrics(tmp_path):
    cli = fit(tmp_path, {"class_path": "lightning.pytorch.loggers.CSVLogger",
                         "init_args": {"save_dir": str(tmp_path / "runs"), "name": "csv"}})
    folder = tmp_path / "runs" / "csv" / "version_0"
    assert Path(cli.model.run_dir()) == folder
    check_rows([json.loads(line) for line in (folder / "completions.jsonl").read_text().splitlines()], [1, 2])
    hparams = yaml.safe_load((folder / "hparams.yaml").read_text())
    assert hparams["model.init_args.group_size"] == GROUP and hparams["trainer.max_steps"] == 2
    header, *lines = (folder / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("final/val/accuracy")
    (final,) = [line.split(",")[column] for line in lines if line.split(",")[column]]
    check_final(cli, {"final/val/accuracy": final})
    assert {"config.yaml", "val_results.jsonl", "adapter", "checkpoints"} <= {p.name for p in folder.iterdir()}


def read_wandb_run(run_dir: Path) -> dict:
    """The offline run as W&B's own reader sees it: config, summary (latest values) and state."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb_cli) if wandb_cli.exists() else "wandb", "leet", "inspect", "--summary", "--json",
                          str(run_dir)], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout)


def test_wandb_logger_offline_gets_a_table_histograms_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    try:
        cli = fit(tmp_path, {"class_path": "lightning.pytorch.loggers.WandbLogger",
                             "init_args": {"save_dir": str(tmp_path), "project": "cepo-test"}})
        run_id = cli.trainer.logger.version
    finally:
        wandb.finish()
    # cepo's own files go to a folder of this run, not the bare save_dir shared by every run.
    assert Path(cli.model.run_dir()) == tmp_path / "cepo-test" / run_id
    assert (tmp_path / "cepo-test" / run_id / "val_results.jsonl").exists()
    assert not (tmp_path / "val_results.jsonl").exists() and not (tmp_path / "config.yaml").exists()

    (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    run = read_wandb_run(run_dir)
    assert run["state"] == "finished"
    assert run["config"]["model.init_args.group_size"] == GROUP
    check_final(cli, run["summary"])
    assert run["summary"]["train/advantage"]["_type"] == "histogram"
    assert run["summary"]["completions"]["_type"] == "table-file"
    tables = sorted((run_dir / "files" / "media" / "table").glob("completions_*.table.json"),
                    key=lambda p: int(p.name.split("_")[1]))
    rows = []
    for step, path in zip([1, 2], tables, strict=True):
        table = json.loads(path.read_text())
        rows += [{"step": step, **dict(zip(table["columns"], row))} for row in table["data"]]
    check_rows(rows, [1, 2])


def mlflow_run(tracking_uri: str, run_id: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    return client, client.get_run(run_id)


def mlflow_table(client, run_id: str, tmp_path: Path) -> list[dict]:
    path = Path(client.download_artifacts(run_id, "completions.json", str(tmp_path / "downloaded")))
    table = json.loads(path.read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


MLFLOW = "lightning.pytorch.loggers.MLFlowLogger"


@pytest.fixture()
def file_store(monkeypatch, tmp_path) -> str:
    """A ``file:`` tracking URI in the test's folder (MLflow 3 wants this opt-in for its file store)."""
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return (tmp_path / "mlruns").as_uri()


def test_mlflow_logger_file_store_gets_the_table_artifact_params_and_metrics(tmp_path, file_store):
    uri = file_store
    cli = fit(tmp_path, {"class_path": MLFLOW, "init_args": {"experiment_name": "cepo-test", "tracking_uri": uri}})
    client, run = mlflow_run(uri, cli.trainer.logger.run_id)
    assert run.data.params["model.init_args.group_size"] == str(GROUP)
    check_final(cli, run.data.metrics)
    check_rows(mlflow_table(client, run.info.run_id, tmp_path), [1, 2])
    assert (Path(cli.model.run_dir()) / "val_results.jsonl").exists()


def test_two_loggers_at_once_each_get_everything(tmp_path, file_store):
    uri = file_store
    cli = fit(tmp_path, [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": "both"}},
        {"class_path": MLFLOW, "init_args": {"experiment_name": "cepo-test", "tracking_uri": uri}},
    ])
    csv_folder = tmp_path / "runs" / "both" / "version_0"
    assert Path(cli.model.run_dir()) == csv_folder  # the first logger names the run's folder
    check_rows([json.loads(line) for line in (csv_folder / "completions.jsonl").read_text().splitlines()], [1, 2])
    assert yaml.safe_load((csv_folder / "hparams.yaml").read_text())["model.init_args.group_size"] == GROUP
    client, run = mlflow_run(uri, cli.trainer.loggers[1].run_id)
    assert run.data.params["model.init_args.group_size"] == str(GROUP)
    check_final(cli, run.data.metrics)
    check_rows(mlflow_table(client, run.info.run_id, tmp_path), [1, 2])
