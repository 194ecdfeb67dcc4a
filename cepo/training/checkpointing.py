"""Always keep the latest training state on disk, whatever the monitored metric did."""

from __future__ import annotations

from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn


class LatestCheckpoint(Callback):
    """Writes ``<checkpoint dir>/last.ckpt`` after every validation and when training ends.

    Lightning's ``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` only when a top-k checkpoint
    was written at the same step, so after a validation that did not improve, ``last.ckpt`` is stale and a
    resumed run would repeat work. This callback makes ``fit --ckpt_path .../last.ckpt`` always continue
    from the newest state.
    """

    def __init__(self, filename: str = "last.ckpt") -> None:
        """
        Args:
            filename: Name of the latest-state checkpoint inside the ModelCheckpoint's folder.
        """
        self.filename = filename
        self._saved_step = -1

    def _save(self, trainer: Trainer) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or trainer.global_step == self._saved_step:
            return
        callback = trainer.checkpoint_callback
        folder = Path(callback.dirpath) if callback is not None and callback.dirpath else Path(
            trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        trainer.save_checkpoint(str(folder / self.filename))
        self._saved_step = trainer.global_step

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer)
