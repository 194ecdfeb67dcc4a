"""``cepo fit|validate|test``: LightningCLI over the RL modules and the prompt data module.

Everything is configured from YAML (``--config``) and flags; ``cepo fit --help`` lists every option with
its type, default and meaning, read from the classes' docstrings.
"""

from __future__ import annotations

import os
import traceback

from jsonargparse import lazy_instance, set_parsing_settings
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from cepo.data.datamodule import PromptDataModule
from cepo.training.checkpoint_meta import check_checkpoint_file
from cepo.training.checkpointing import LatestCheckpoint
from cepo.training.export import AdapterCheckpoint, CEPOTrainer, MergedExport
from cepo.training.module import CEPOModule
from cepo.training.predict import PredictionWriter


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

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            cause = own_error(err)
            if cause is None:
                raise
            # jsonargparse wraps an error raised while building a class in a dump of the whole parsed
            # configuration; the option and the fix are in cepo's own message, so that is what is shown.
            raise cause from None

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # `cepo export`: merge a checkpoint's LoRA adapter into the base weights (CEPOTrainer.export).
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def before_fit(self) -> None:
        self._check_trainer()

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path with torch.load right after parsing; an empty or foreign file
        # would fail there with a bare EOFError or pickle advice, so it is named first.
        if self.config.get("subcommand"):
            check_checkpoint_file(self.config[self.config.subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()

    def after_fit(self) -> None:
        self._log_hparams()

    def _log_hparams(self) -> None:
        """TensorBoard's HParams tab: every resolved option of this run with its final metrics (the last
        validation's, and the last training reward), so runs can be compared side by side."""
        logger = self.trainer.logger
        if logger is None:
            return
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        params = flatten_config(config.as_dict())
        metrics = {f"final/{key}": value for key, value in getattr(self.model, "last_val_metrics", {}).items()}
        reward = self.trainer.callback_metrics.get("train/reward")
        if reward is not None:
            metrics["final/train/reward"] = float(reward)
        if metrics:
            logger.log_hyperparams(params, metrics)

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


def own_error(err: BaseException) -> BaseException | None:
    """The innermost exception in ``err``'s chain of causes when cepo's own code raised it (while
    jsonargparse was building a class from the configuration), else None."""
    inner = err
    while inner.__cause__ is not None:
        inner = inner.__cause__
    if inner is err:
        return None
    frames = traceback.extract_tb(inner.__traceback__)
    package = os.path.dirname(os.path.abspath(__file__))
    return inner if frames and os.path.abspath(frames[-1].filename).startswith(package + os.sep) else None


def flatten_config(config: dict, prefix: str = "") -> dict[str, object]:
    """``{"model": {"init_args": {"lr": 1}}}`` -> ``{"model.init_args.lr": 1}``; lists and other values are
    kept whole (the logger turns them into text)."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat


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
