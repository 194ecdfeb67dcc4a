"""Always keep the latest training state on disk, whatever the monitored metric did, also on preemption."""

from __future__ import annotations

import signal
from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cepo.training.loggers import run_dir

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
"""143: the status a shell reports for a process ended by SIGTERM, which schedulers read as "terminated"."""


class LatestCheckpoint(Callback):
    """Writes ``<checkpoint dir>/last.ckpt`` after every validation, when training ends, and when the job
    is preempted (SIGTERM).

    Lightning's ``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` only when a top-k checkpoint
    was written at the same step, so after a validation that did not improve, ``last.ckpt`` is stale and a
    resumed run would repeat work. This callback makes ``fit --ckpt_path .../last.ckpt`` always continue
    from the newest state.

    Preemption: on SIGTERM Lightning finishes the rollout step in progress, then raises
    ``SIGTERMException`` at the step boundary on every rank. This callback then writes ``last.ckpt`` with
    that step's state (weights, optimiser, scheduler, RNG, data position) and makes the process exit with
    status ``sigterm_exit_code`` instead of Lightning's 0, so that a scheduler or a job script sees an
    interrupted run, not a finished one.
    """

    def __init__(self, filename: str = "last.ckpt", save_on_sigterm: bool = True,
                 sigterm_exit_code: int = SIGTERM_EXIT_CODE) -> None:
        """
        Args:
            filename: Name of the latest-state checkpoint inside the ModelCheckpoint's folder.
            save_on_sigterm: Write it when the job receives SIGTERM (preemption, ``scancel``, a time limit).
            sigterm_exit_code: Exit status after a SIGTERM (143 = 128 + SIGTERM, the shell's convention for
                a process ended by SIGTERM; non-zero, so restart-on-failure policies restart the job).
        """
        self.filename = filename
        self.save_on_sigterm = save_on_sigterm
        self.sigterm_exit_code = sigterm_exit_code
        self._saved_step = -1

    def path(self, trainer: Trainer) -> Path:
        callback = trainer.checkpoint_callback
        if callback is not None and callback.dirpath:
            return Path(callback.dirpath) / self.filename
        return run_dir(trainer) / "checkpoints" / self.filename

    def _save(self, trainer: Trainer) -> bool:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or trainer.global_step == self._saved_step:
            return False
        trainer.save_checkpoint(str(self.path(trainer)), weights_only=False)  # the full state, to resume
        self._saved_step = trainer.global_step
        return True

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        if self.save_on_sigterm and trainer.state.fn == TrainerFn.FITTING:
            saved = self._save(trainer)
            rank_zero_info(
                f"SIGTERM: {'wrote' if saved else 'kept'} {self.path(trainer)} at rollout step "
                f"{trainer.global_step}; resume with `cepo fit ... --ckpt_path {self.path(trainer)}`"
            )
        # Lightning re-raises the exception after the callbacks; a SystemExit's code is the exit status.
        # An interrupted validate/test did not finish either, so it exits non-zero too.
        exception.code = self.sigterm_exit_code
