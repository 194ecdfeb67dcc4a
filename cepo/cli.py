"""``cepo fit|validate|test``: LightningCLI over the RL modules and the prompt data module.

Everything is configured from YAML (``--config``) and flags; ``cepo fit --help`` lists every option with
its type, default and meaning, read from the classes' docstrings.
"""

from __future__ import annotations

import os

from jsonargparse import lazy_instance, set_parsing_settings
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

from cepo.data.datamodule import PromptDataModule
from cepo.training.checkpointing import LatestCheckpoint
from cepo.training.export import AdapterCheckpoint, CEPOTrainer, MergedExport
from cepo.training.module import CEPOModule
from cepo.training.predict import PredictionWriter
from cepo.training.run_logging import log_hyperparameters, run_dir


class SaveRunConfig(SaveConfigCallback):
    """Writes the resolved ``config.yaml`` into the run's folder (:func:`cepo.training.run_logging.run_dir`,
    unique per run for every logger). A ``predict`` whose output goes elsewhere (``--prediction.output``)
    writes nothing, so it leaves no run folder behind."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved or not self.save_to_log_dir:
            return
        if stage == "predict" and any(isinstance(cb, PredictionWriter) and cb.output for cb in trainer.callbacks):
            return
        path = run_dir(trainer) / self.config_filename  # every rank: the path is broadcast
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(path), skip_none=False, overwrite=self.overwrite,
                             multifile=self.multifile)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class CEPOCLI(LightningCLI):
    def __init__(self, *args, trainer_class=CEPOTrainer, **kwargs) -> None:
        # CEPOTrainer adds the `export` subcommand; it is the default however the CLI is built.
        super().__init__(*args, trainer_class=trainer_class, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"model": {"class_path": "cepo.GRPO"}})
        # Checkpoints follow a validation accuracy, never the RL loss (which is not a progress signal).
        parser.add_lightning_class_args(AdapterCheckpoint, "checkpoint")  # + <ckpt>-adapter/ beside each
        parser.set_defaults({
            "checkpoint.monitor": "val/accuracy",
            "checkpoint.mode": "max",
            "checkpoint.save_last": False,  # LatestCheckpoint keeps last.ckpt current
            "checkpoint.filename": "step{rollout_step:.0f}-acc{val/accuracy:.3f}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(LatestCheckpoint, "latest_checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "prediction")  # `cepo predict`'s output options
        parser.add_lightning_class_args(MergedExport, "merge")  # --merge.at_fit_end true: merged model

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # `cepo export`: merge a checkpoint's LoRA adapter into the base weights (CEPOTrainer.export).
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def before_fit(self) -> None:
        self._check_trainer()

    def after_fit(self) -> None:
        self._log_hparams()

    def _log_hparams(self) -> None:
        """Every resolved option of this run with its final metrics (the last validation's, and the last
        training reward), through each logger's own API (TensorBoard: the HParams tab), so runs can be
        compared side by side."""
        if not self.trainer.loggers:
            return
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        params = flatten_config(config.as_dict())
        metrics = {f"final/{key}": value for key, value in getattr(self.model, "last_val_metrics", {}).items()}
        reward = self.trainer.callback_metrics.get("train/reward")
        if reward is not None:
            metrics["final/train/reward"] = float(reward)
        step = int(getattr(self.model, "rollout_step", self.trainer.global_step))
        if self.trainer.is_global_zero:
            log_hyperparameters(self.trainer.loggers, params, metrics, step)

    def _check_trainer(self) -> None:
        trainer = self.trainer
        if trainer.max_steps is None or trainer.max_steps < 0:
            raise ValueError(
                "trainer.max_steps must be set: training prompts are an endless stream, so the run length is "
                "counted in rollout steps (e.g. --trainer.max_steps 200)"
            )
        if trainer.accumulate_grad_batches != 1 or trainer.gradient_clip_val:
            raise ValueError(
                "trainer.accumulate_grad_batches and trainer.gradient_clip_val do not apply to cepo's manual "
                "optimisation; use model.mini_batch_size/model.micro_batch_size and model.optim.max_grad_norm"
            )


def flatten_config(config: dict, prefix: str = "") -> dict[str, object]:
    """``{"model": {"init_args": {"lr": 1}}}`` -> ``{"model.init_args.lr": 1}``; lists and other values are
    kept whole (the logger turns them into text); every value is made plain (tuples become lists, paths
    and other objects their text), so each logger can write it as YAML or JSON."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = plain(value)
    return flat


def plain(value: object) -> object:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    return str(value)


def main(args: list[str] | None = None) -> CEPOCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The config dataclasses document each field in an attribute docstring; show them in --help.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    return CEPOCLI(
        CEPOModule,
        PromptDataModule,
        subclass_mode_model=True,
        auto_configure_optimizers=False,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        trainer_defaults={
            "logger": lazy_instance(TensorBoardLogger, save_dir="runs", name="cepo"),
            "num_sanity_val_steps": 0,
            "check_val_every_n_epoch": None,
            "max_epochs": -1,
        },
        args=args,
    )


def entry_point() -> None:
    """The ``cepo`` console script (returns None, so the exit status is 0 on success)."""
    main()


if __name__ == "__main__":
    entry_point()
