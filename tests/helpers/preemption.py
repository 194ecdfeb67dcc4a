"""A callback for preemption tests, loaded by the ``cepo`` process under test through its YAML config."""

import time
from pathlib import Path

from lightning import Callback


class PauseForSignalAtStep(Callback):
    """After rollout step ``step`` finishes, write ``marker`` and wait until the trainer has received
    SIGTERM (sent by the test), so that the signal always lands at the same step boundary."""

    def __init__(self, step: int, marker: str, timeout_s: float = 120.0) -> None:
        self.step, self.marker, self.timeout_s = step, Path(marker), timeout_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        self.marker.write_text(str(trainer.global_step))
        deadline = time.monotonic() + self.timeout_s
        while not trainer.received_sigterm:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no SIGTERM within {self.timeout_s} s of {self.marker}")
            time.sleep(0.05)


class RaiseAtStep(Callback):
    """After rollout step ``step`` finishes, raise an ordinary ``ValueError``: an error during fit that is
    not a preemption."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise ValueError(f"an ordinary error at rollout step {self.step}")
