"""``cepo fit|validate|test``: LightningCLI over the RL modules and the prompt data module.

Everything is configured from YAML (``--config``) and flags; ``cepo fit --help`` lists every option with
its type, default and meaning, read from the classes' docstrings.
"""

from __future__ import annotations

import logging
import os
import traceback
import warnings

from jsonargparse import lazy_instance, set_parsing_settings
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

from cepo.data.datamodule import PromptDataModule
from cepo.rewards.base import refuse_doubled_rewards
from cepo.training.checkpoint_meta import check_checkpoint_file
from cepo.training.checkpointing import LatestCheckpoint
from cepo.training.export import AdapterCheckpoint, CEPOTrainer, MergedExport
from cepo.training.module import CEPOModule
from cepo.training.predict import PredictionWriter
from cepo.training.loggers import log_hyperparameters, run_dir


class SaveRunConfig(SaveConfigCallback):
    """Writes the resolved ``config.yaml`` into the run's folder (:func:`cepo.training.loggers.run_dir`,
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


class RolloutRichProgressBar(RichProgressBar):
    """Lightning's progress bar without what means nothing for cepo: epochs (the prompt stream is endless,
    so Lightning shows ``Epoch 0/-2``) and the logger's version number."""

    def _get_train_description(self, current_epoch: int) -> str:
        return "Rollout steps"

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class RolloutTQDMProgressBar(TQDMProgressBar):
    """The same for the plain-text progress bar (used where ``rich`` is not installed)."""

    def on_train_epoch_start(self, trainer, *_) -> None:
        super().on_train_epoch_start(trainer, *_)
        self.train_progress_bar.set_description("Rollout steps")

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class _DropLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


def quiet_third_party() -> None:
    """Silence messages from libraries that say nothing about the user's run: Lightning's advertisement
    for its cloud logger, transformers' weight-loading progress bars, PEFT's call of a transformers
    property deprecated in v6, Lightning's own use of a deprecated torch ``LeafSpec``, and its notice that
    a restored checkpoint's folder differs from the new run's. Warnings from cepo's own code stay."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLightningTips())
    warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # Lightning, restoring a checkpoint into a new run folder (validate, predict): nothing to act on.
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" of a small model


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

    def instantiate_trainer(self, **kwargs):
        # Lightning refuses two stateful callbacks of one type with a message about state keys; two stacked
        # reward presets are the usual cause, so say that first.
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        callbacks = config.get("trainer", {}).get("callbacks") or []
        refuse_doubled_rewards(callbacks if isinstance(callbacks, list) else [callbacks])
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "predict" and any(isinstance(cb, PredictionWriter) and cb.output
                                                for cb in trainer.callbacks):
            # The predictions go to their own file and predict logs nothing, but Lightning opens every
            # logger at setup, which would create an empty run folder.
            trainer.loggers = []
        # Lightning's default progress bar (the exact class; a user's own stays) -> one that counts rollouts.
        for i, callback in enumerate(trainer.callbacks):
            if type(callback) is RichProgressBar:
                trainer.callbacks[i] = RolloutRichProgressBar()
            elif type(callback) is TQDMProgressBar:
                trainer.callbacks[i] = RolloutTQDMProgressBar()
        return trainer

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
    # Lightning's CLI (and the config writer beside it) passes options jsonargparse 4.49+ deprecates; the
    # notice is about their code, not the user's config (set the variable to "all" to see them).
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    quiet_third_party()
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
            # cepo logs every resolved option with the final metrics at the end of fit (_log_hparams);
            # Lightning's empty start-of-run entry would also make `predict` create a run folder.
            "enable_autolog_hparams": False,
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
