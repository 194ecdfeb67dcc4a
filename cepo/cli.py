"""``cepo fit|validate|test``: LightningCLI over the RL modules and the prompt data module.

Everything is configured from YAML (``--config``) and flags; ``cepo fit --help`` lists every option with
its type, default and meaning, read from the classes' docstrings.
"""

from __future__ import annotations

import os

from jsonargparse import lazy_instance, set_parsing_settings
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from cepo.data.datamodule import PromptDataModule
from cepo.training.checkpointing import LatestCheckpoint
from cepo.training.export import AdapterCheckpoint, CEPOTrainer, MergedExport
from cepo.training.module import CEPOModule
from cepo.training.predict import PredictionWriter


class CEPOCLI(LightningCLI):
    def __init__(self, *args, trainer_class=CEPOTrainer, **kwargs) -> None:
        # CEPOTrainer adds the `export` subcommand; it is the default however the CLI is built.
        super().__init__(*args, trainer_class=trainer_class, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"model": {"class_path": "cepo.training.module.GRPO"}})
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


def main(args: list[str] | None = None) -> CEPOCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The config dataclasses document each field in an attribute docstring; show them in --help.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    return CEPOCLI(
        CEPOModule,
        PromptDataModule,
        subclass_mode_model=True,
        auto_configure_optimizers=False,
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
