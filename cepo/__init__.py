"""cepo: Causally-Enhanced Policy Optimization (CE-PO) as a PyTorch Lightning template.

The names below (``cepo.GRPO``, ``cepo.ShortcutTask``, ...) are what configs give as ``class_path``. They
are imported on first use, so ``import cepo.rl`` or ``import cepo.answers`` loads neither Lightning nor
PEFT.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CoherenceScorer": "cepo.coherence.scorer",
    "PromptDataModule": "cepo.data.datamodule",
    "PromptFile": "cepo.data.prompt_file",
    "DatasetSource": "cepo.data.sources",
    "FileDataset": "cepo.data.sources",
    "PaperMix": "cepo.data.sources",
    "ShortcutTask": "cepo.data.sources",
    "AccuracyReward": "cepo.rewards.base",
    "FormatReward": "cepo.rewards.base",
    "NetworkReward": "cepo.rewards.base",
    "RewardFunction": "cepo.rewards.base",
    "FunctionReward": "cepo.rewards.function",
    "CoherenceRewardCallback": "cepo.training.coherence_callback",
    "InterventionalRewardCallback": "cepo.training.interventional_callback",
    "RewardDiagnostics": "cepo.training.diagnostics_callback",
    "CEPOModule": "cepo.training.module",
    "GRPO": "cepo.training.module",
    "PPO": "cepo.training.module",
    "RLOO": "cepo.training.module",
    "ReinforcePP": "cepo.training.module",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cepo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
