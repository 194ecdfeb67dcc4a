"""Always keep the latest training state on disk, whatever the monitored metric did, also on preemption;
and write every checkpoint file and folder so that a kill leaves the old one or the new one, never a
half-written one.

* :class:`AtomicCheckpointIO` (installed by the CLI's trainer) writes ``*.ckpt`` files to a temporary file
  in the checkpoint's own folder, fsyncs it and renames it over the target. Lightning's own writer stages
  the file in the system temp folder and moves it; when that folder is on another filesystem (a local
  ``/tmp`` and a shared checkpoint disk) the move is a copy, and a kill mid-copy truncates the target.
* :func:`atomic_folder` does the same for folders (LoRA adapters, merged exports): they are written to a
  temporary sibling folder and swapped in with a rename.

A temporary name carries the writer's host and process id (``.<name>.<host>-<pid>.<random>.tmp`` or
``.partial``). A ``SIGKILL`` or a power cut leaves it behind; the next write of the same target removes
the leftovers of writers on this host that are no longer running, and logs how many it removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cepo.training.loggers import run_dir

logger = logging.getLogger(__name__)

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
"""143: the status a shell reports for a process ended by SIGTERM, which schedulers read as "terminated"."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.{socket.gethostname()}-{os.getpid()}."


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the process exists under another user
        return True
    return True


def remove_stale_staging(target: Path) -> int:
    """Remove the temporary files and folders that writers of ``target`` on this host left when they were
    killed before finishing (their process is gone); returns how many. Leftovers of a running writer, or
    of another host (a shared disk), are kept."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?P<host>.+)-(?P<pid>\d+)\.[^.]+\.(?:tmp|partial)$")
    host, removed = socket.gethostname(), 0
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return 0
    for sibling in siblings:
        found = pattern.match(sibling.name)
        if found is None or found["host"] != host or _running(int(found["pid"])):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                sibling.unlink()
        removed += 1
    if removed:
        logger.info("removed %d unfinished write(s) of %s left by a killed process", removed, target)
    return removed


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` as one step: written to a temporary file beside ``path`` (same folder, so
    the same filesystem, whatever ``TMPDIR`` says), fsynced, then renamed over ``path`` with
    ``os.replace``. A kill at any point leaves the previous file or the new one, complete."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=_staging_prefix(target), suffix=".tmp")
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 -> what a plain open() would give
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_folder(target.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with local checkpoint files written by :func:`atomic_save`
    (remote URLs keep Lightning's writer)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system or
    the filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Write a folder as one step: yields a temporary sibling folder (``.<name>.<host>-<pid>.<random>.partial``) to
    write into; on success its files are fsynced and it is swapped in for ``path``, and the previous
    folder is deleted; on an error it is deleted and ``path`` is left as it was.

    The swap is one atomic rename on Linux (``renameat2``, exchanging the two folders). Elsewhere the
    previous folder is first renamed aside, then the new one into place: a kill between those two
    renames leaves the previous folder complete under ``.<name>.<random>.previous``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=_staging_prefix(target), suffix=".partial"))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 -> what a plain mkdir would give
        yield staging
        for root, _, files in os.walk(staging):
            for name in files:
                with open(os.path.join(root, name), "rb") as handle:
                    os.fsync(handle.fileno())
            _fsync_folder(Path(root))
        if not target.exists():
            os.rename(staging, target)
        elif _exchange(staging, target):
            shutil.rmtree(staging)  # now holds the previous folder
        else:
            previous = staging.with_suffix(".previous")
            os.rename(target, previous)
            os.rename(staging, target)
            shutil.rmtree(previous)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_folder(target.parent)


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
