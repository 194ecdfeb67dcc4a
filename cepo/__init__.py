"""cepo: Causally-Enhanced Policy Optimization (CE-PO) as a PyTorch Lightning template."""

from cepo.coherence.scorer import CoherenceScorer
from cepo.data.datamodule import PromptDataModule
from cepo.data.prompt_file import PromptFile
from cepo.data.sources import DatasetSource, FileDataset, PaperMix, ShortcutTask
from cepo.rewards.base import AccuracyReward, FormatReward, NetworkReward, RewardFunction
from cepo.rewards.function import FunctionReward
from cepo.training.coherence_callback import CoherenceRewardCallback
from cepo.training.interventional_callback import InterventionalRewardCallback
from cepo.evaluation.diagnostics import RewardDiagnostics
from cepo.training.module import GRPO, PPO, RLOO, CEPOModule, ReinforcePP

__all__ = [
    "AccuracyReward", "CEPOModule", "CoherenceRewardCallback", "CoherenceScorer", "DatasetSource", "FileDataset",
    "FormatReward", "FunctionReward", "GRPO", "NetworkReward", "PaperMix", "PPO", "PromptDataModule", "PromptFile", "RLOO",
    "ReinforcePP", "RewardFunction", "ShortcutTask", "InterventionalRewardCallback", "RewardDiagnostics",
]
__version__ = "0.1.0"
