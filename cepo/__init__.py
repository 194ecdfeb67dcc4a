"""cepo: Causally-Enhanced Policy Optimization (CE-PO) as a PyTorch Lightning template."""

from cepo.data.datamodule import PromptDataModule
from cepo.data.sources import DatasetSource, FileDataset, PaperMix, ShortcutTask
from cepo.rewards.base import AccuracyReward, FormatReward, RewardFunction
from cepo.training.module import CEPOModule, GRPO

__all__ = [
    "AccuracyReward", "CEPOModule", "DatasetSource", "FileDataset", "FormatReward", "GRPO", "PaperMix",
    "PromptDataModule", "RewardFunction", "ShortcutTask",
]
__version__ = "0.1.0"
