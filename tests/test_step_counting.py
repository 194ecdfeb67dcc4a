"""One training step is one rollout however many optimiser steps it runs: ``fold_optimizer_steps`` is the
only code that touches Lightning's private progress counters, and these tests fail loudly if a Lightning
upgrade moves them or changes how manual optimisation counts steps."""

import torch
from lightning import LightningModule, Trainer
from torch.utils.data import DataLoader

from cepo.training.module import fold_optimizer_steps

STEPS_PER_BATCH = 3


class ManySteps(LightningModule):
    """Manual optimisation with three optimiser steps per batch, optionally folded into one."""

    def __init__(self, fold: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.fold = fold
        self.optimizer_steps = 0
        self.batches = 0

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        self.batches += 1
        for step in range(1, STEPS_PER_BATCH + 1):
            self.manual_backward((self.weight - 1.0).pow(2).sum())
            optimizer.step()
            optimizer.zero_grad()
            self.optimizer_steps += 1
            if self.fold:
                fold_optimizer_steps(self.trainer, step)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(torch.zeros(100, 1), batch_size=1)


def fit(module: ManySteps, max_steps: int) -> Trainer:
    trainer = Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    return trainer


def test_lightning_counts_every_manual_optimizer_step():
    # The behaviour cepo compensates for: without folding, 4 "steps" are over after 2 batches of 3.
    module = ManySteps(fold=False)
    trainer = fit(module, max_steps=4)
    assert module.batches == 2 and trainer.global_step == 6 == module.optimizer_steps


def test_folded_steps_count_one_per_batch():
    module = ManySteps(fold=True)
    trainer = fit(module, max_steps=4)
    assert module.batches == 4 and trainer.global_step == 4
    assert module.optimizer_steps == 4 * STEPS_PER_BATCH  # every optimiser step still ran
