"""Where a run's rich outputs go, for whichever Lightning loggers the trainer holds.

Scalars reach every logger through ``LightningModule.log``. Three outputs need each logger's own API, and
this module is the one place that knows them:

* the **completions table** (prompt, completion, answer, gold, every reward term, the advantage):
  TensorBoard text (*Text* tab), a ``wandb.Table`` (W&B), the ``completions.json`` table artifact of the
  MLflow run (one table over all steps, with a ``step`` column), ``completions.jsonl`` beside the CSV
  logger's ``metrics.csv``;
* **histograms** of every reward term and of the advantages: TensorBoard and W&B (MLflow and CSV have
  no histogram; the per-row values are in the completions table);
* the run's **hyperparameters** (every resolved option) with its final metrics: the HParams tab for
  TensorBoard, ``log_hyperparams`` plus ``final/...`` metrics for every other logger (W&B config and
  summary, MLflow params and metrics, the CSV logger's ``hparams.yaml`` and ``metrics.csv``).

Any other logger gets the hyperparameters and final metrics through the generic ``Logger`` API and no
table or histogram. :func:`run_dir` is the folder of a run's own files (config, results, checkpoints,
adapter), unique per run whichever logger comes first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

COMPLETIONS_KEY = "completions"
TENSORBOARD_CELL_CHARS = 300  # TensorBoard renders a markdown table: keep each text cell to its last 300


def run_dir(trainer: Trainer) -> Path:
    """The run's folder: the first logger's ``log_dir`` for TensorBoard and CSV (``<save_dir>/<name>/version_N``),
    ``<save_dir>/<name>/<version>`` for any other logger (where Lightning puts its checkpoints; W&B:
    ``<project>/<run id>``, MLflow: ``<experiment id>/<run id>``), ``default_root_dir`` without a logger.
    (``trainer.log_dir`` is a logger's bare ``save_dir`` for W&B and MLflow, shared by every run.)
    Call on every rank: the path is broadcast from rank 0."""
    loggers = trainer.loggers
    if not loggers:
        path = trainer.default_root_dir
    elif isinstance(loggers[0], (TensorBoardLogger, CSVLogger)):
        path = loggers[0].log_dir
    else:
        logger = loggers[0]
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        path = os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)
    return Path(trainer.strategy.broadcast(path))


@dataclass
class CompletionsTable:
    """Rows of one logged rollout step: text columns, then one float column per reward term (and the
    advantage)."""

    step: int
    text_columns: list[str]
    number_columns: list[str]
    rows: list[tuple[list[str], list[float]]]

    @property
    def columns(self) -> list[str]:
        return self.text_columns + self.number_columns

    def records(self) -> list[dict[str, object]]:
        return [{"step": self.step, **dict(zip(self.text_columns, texts)), **dict(zip(self.number_columns, numbers))}
                for texts, numbers in self.rows]

    def markdown(self) -> str:
        """The table as markdown, each text cell escaped and cut to its last characters, numbers rounded
        (advantages signed)."""
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for texts, numbers in self.rows:
            cells = [t.replace("|", "\\|").replace("\n", "⏎")[-TENSORBOARD_CELL_CHARS:] for t in texts]
            cells += [f"{v:+.3f}" if name == "advantage" else f"{v:.3f}" for name, v in zip(self.number_columns, numbers)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def log_completions(loggers: Iterable[Logger], table: CompletionsTable) -> None:
    """The table on each logger that can show one: TensorBoard text, a W&B table, rows appended to the
    MLflow run's ``completions.json`` artifact, lines appended to the CSV logger's ``completions.jsonl``."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(COMPLETIONS_KEY, table.markdown(), global_step=table.step)
        elif isinstance(logger, WandbLogger):
            logger.log_table(COMPLETIONS_KEY, columns=table.columns,
                             data=[list(texts) + list(numbers) for texts, numbers in table.rows], step=table.step)
        elif isinstance(logger, MLFlowLogger):
            columns = ["step", *table.columns]
            data = {name: [record[name] for record in table.records()] for name in columns}
            logger.experiment.log_table(logger.run_id, data=data, artifact_file=f"{COMPLETIONS_KEY}.json")
        elif isinstance(logger, CSVLogger):
            path = Path(logger.log_dir) / f"{COMPLETIONS_KEY}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as handle:
                for record in table.records():
                    handle.write(json.dumps(record) + "\n")


def log_histograms(loggers: Iterable[Logger], values: Mapping[str, torch.Tensor], step: int) -> None:
    """One histogram per named 1-D tensor, on the loggers that draw histograms."""
    values = {name: tensor.detach().float().cpu() for name, tensor in values.items()}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            for name, tensor in values.items():
                logger.experiment.add_histogram(name, tensor, global_step=step)
        elif isinstance(logger, WandbLogger):
            import wandb

            logger.log_metrics({name: wandb.Histogram(tensor.numpy()) for name, tensor in values.items()}, step=step)


def log_hyperparameters(loggers: Iterable[Logger], params: Mapping[str, object], metrics: Mapping[str, float],
                        step: int) -> None:
    """Every resolved option with the run's final metrics, through each logger's own API. Called after
    ``fit``, when Lightning has already finalised the loggers, so buffered writers are flushed here."""
    params, metrics = dict(params), {k: float(v) for k, v in metrics.items()}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            # HParams tab: the options side by side with these metrics (TensorBoard-only signature).
            logger.log_hyperparams(params, metrics or None)
            continue
        logger.log_hyperparams(params)
        if metrics:
            logger.log_metrics(metrics, step=step)
        logger.save()  # CSVLogger buffers rows until save(); the others write at once
