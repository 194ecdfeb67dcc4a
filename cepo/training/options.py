"""The training module's options (one dataclass per group, as they appear under ``model.init_args``) and
the checks that refuse a bad combination before anything is loaded or trained."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

from cepo.data.prompts import FAMILIES
from cepo.policy.generation import check_generation_options
from cepo.rl.advantages import ADVANTAGE_ESTIMATORS, ADVANTAGE_OPTIONS, AdvantageEstimatorName, AdvantageScale
from cepo.rl.kl import KLEstimatorName
from cepo.rl.losses import LossAggregationName, PolicyLossName


@dataclass
class OptimConfig:
    """AdamW and its schedule (stepped once per optimiser step by the module)."""

    lr: float = 1e-5
    """Peak learning rate of the LoRA weights (and value head)."""
    weight_decay: float = 0.01
    """AdamW weight decay (the CE-PO authors used 0.01)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """``constant``, ``linear`` (decay to 0) or ``cosine`` (decay to 0), after warmup."""
    warmup_steps: int = 0
    """Optimiser steps of linear warmup from 0."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value (None disables clipping; the norm is still logged)."""


PromptTemplate = Literal[("auto", *FAMILIES)]


@dataclass
class PromptConfig:
    """How an example becomes the prompt Z that the policy sees, and how Y is found in a completion."""

    template: PromptTemplate = "auto"
    """Prompt family: ``auto`` (each dataset's own), ``raw`` (the question unchanged; alias ``plain``),
    ``math``, ``multiple_choice``, ``yes_no`` or ``open``."""
    use_chat_template: bool = False
    """Wrap the prompt with the tokenizer's chat template (instruct models)."""
    system_prompt: str | None = None
    """Optional system message (chat template only)."""
    marker: str = "answer"
    """Answer marker the prompt asks for: ``answer`` (<answer>...</answer>), ``finalanswer``, ``boxed``,
    ``gsm8k`` (#### n) or any tag name."""
    parse_markers: list[str] = field(default_factory=lambda: ["answer", "finalanswer", "boxed", "gsm8k"])
    """Markers the answer parser accepts, in priority order (the asked-for marker is tried first)."""


@dataclass
class AdvantageConfig:
    """How a rollout's rewards become advantages (:mod:`cepo.rl.advantages`)."""

    estimator: AdvantageEstimatorName = "grpo"
    """``grpo``: reward minus its group's mean, scaled by ``scale`` (Shao et al. 2024). ``rloo``: reward minus
    the mean of the other samples of its group (Ahmadian et al. 2024). ``reinforce_pp``: per-token returns
    normalised over the batch (REINFORCE++, Hu 2025). ``gae``: generalised advantage estimation with the
    critic's values (Schulman et al. 2016; needs ``model.critic``)."""
    scale: AdvantageScale = "group"
    """``grpo`` only: divide the centred reward by the group's std (GRPO), the whole batch's std (TRL's
    ``scale_rewards=batch``; global over devices) or nothing (Dr. GRPO)."""
    min_std: float = 0.0
    """``grpo`` only: floor on the std divisor (0 = off). A group whose std is below ``min_std`` is divided
    by ``min_std`` instead, so small reward differences within a group (e.g. coherence scores when every
    sample is equally right) are not inflated to unit-size advantages."""
    per_term: bool = False
    """``grpo`` only: compute the advantage of each reward term within the group (each term centred and
    scaled on its own), then combine them with the terms' normalised weights, instead of z-scoring the
    fused reward. The power mean's exponent then enters only the logged fused reward."""
    gamma: float = 1.0
    """``gae`` and ``reinforce_pp``: discount of per-token returns (CE-PO authors' PPO run: 1.0)."""
    lam: float = 1.0
    """``gae`` only: lambda; 1 = Monte-Carlo returns minus values, 0 = one-step TD (authors: 1.0)."""
    whiten: bool = False
    """Normalise the advantages to mean 0, variance 1 over the rollout's completion tokens (over all devices
    under data parallelism), as PPO implementations do."""


@dataclass
class PolicyLossConfig:
    """The policy loss (:mod:`cepo.rl.losses`) and how it is reduced over tokens."""

    name: PolicyLossName = "clipped_surrogate"
    """Registered per-token policy loss: ``clipped_surrogate`` (PPO's clipped ratio times advantage)."""
    epsilon: float = 0.2
    """Lower clip range of the policy ratio (and upper, unless ``epsilon_high`` is set)."""
    epsilon_high: float | None = None
    """Separate upper clip range ("clip-higher", DAPO; e.g. 0.28)."""
    aggregation: LossAggregationName = "dapo"
    """``grpo`` (mean per sequence, then over sequences), ``dapo`` (mean over all tokens of the mini-batch),
    ``dr_grpo`` (sum / (sequences x max_new_tokens))."""


@dataclass
class KLConfig:
    """The KL divergence to the frozen reference policy (:mod:`cepo.rl.kl`)."""

    coef: float = 0.001
    """KL coefficient (initial value when ``target`` is set); the default is the CE-PO authors' value. 0
    with no ``target`` skips the reference forward pass."""
    placement: Literal["loss", "reward"] = "loss"
    """``loss``: a per-token KL term added to the policy loss (GRPO). ``reward``: a per-token penalty
    ``-coef * KL`` in the rewards, before the advantages (Ziegler et al. 2019; PPO, REINFORCE++)."""
    estimator: KLEstimatorName | None = None
    """Per-token KL estimator ``k1``, ``k2`` or ``k3`` (Schulman 2020). None: ``k3`` as a loss term, ``k1``
    in the reward."""
    target: float | None = None
    """Target KL per sequence (summed over tokens, k1, measured on each rollout) of the adaptive controller
    of Ziegler et al. 2019; None keeps ``coef`` fixed."""
    horizon: int = 10000
    """Horizon of the adaptive controller in samples: the coefficient moves by at most 20 % per ``horizon``
    completions."""

    def resolved_estimator(self) -> str:
        return self.estimator or ("k3" if self.placement == "loss" else "k1")


_DEFAULT_ADVANTAGE = {f.name: f.default for f in fields(AdvantageConfig)}


def unread_advantage_options(advantage: AdvantageConfig, reads: tuple[str, ...]) -> list[str]:
    """The estimator options set away from their defaults that an estimator reading only ``reads`` would
    ignore."""
    return [name for name in ADVANTAGE_OPTIONS if name not in reads and getattr(advantage, name) != _DEFAULT_ADVANTAGE[name]]


class OptionChecks:
    """The training module's checks of its own options (a mixin of :class:`~cepo.training.module.CEPOModule`:
    they read the module's option attributes)."""

    def _check_static_options(self) -> None:
        names = [r.name for r in self.reward_functions]
        if len(set(names)) != len(names):
            raise ValueError(f"model.rewards has duplicate names {names}; set `name` on each reward")
        for name, weight in self.reward_weights.items():
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"model.reward_weights[{name!r}]={weight} must be a finite number >= 0")
        if self.group_size < 1 or self.micro_batch_size < 1 or self.num_iterations < 1:
            raise ValueError("model.group_size, model.micro_batch_size and model.num_iterations must be >= 1")
        if self.reward_stall_steps < 0:
            raise ValueError(f"model.reward_stall_steps={self.reward_stall_steps} must be >= 0 (0 never warns)")
        if self.eval_num_samples < 1:
            raise ValueError("model.eval_num_samples must be >= 1")
        if self.eval_num_samples > 1 and self.generation.eval_temperature <= 0:
            raise ValueError(
                f"model.eval_num_samples={self.eval_num_samples} samples identical greedy completions; set "
                "model.generation.eval_temperature > 0 (e.g. 0.6) or eval_num_samples to 1"
            )
        check_generation_options(self.generation, training=False)
        if self.optim.scheduler not in ("constant", "linear", "cosine"):
            raise ValueError(f"model.optim.scheduler={self.optim.scheduler!r}; choose constant, linear or cosine")
        if not math.isfinite(self.reward_p) and abs(self.reward_p) != math.inf:
            raise ValueError("model.reward_p must be a number (inf and -inf are allowed)")
        loss, adv, kl = self.loss, self.advantage, self.kl
        if loss.epsilon < 0 or (loss.epsilon_high is not None and loss.epsilon_high < 0):
            raise ValueError("model.loss.epsilon and model.loss.epsilon_high must be >= 0 (0.2 is usual)")
        if not kl.coef >= 0:
            raise ValueError(f"model.kl.coef={kl.coef} must be >= 0 (0 disables the KL to the reference)")
        if kl.target is not None:
            if not kl.target > 0:
                raise ValueError(f"model.kl.target={kl.target} must be > 0, or None for a fixed kl.coef")
            if not kl.coef > 0:
                raise ValueError("model.kl.target needs model.kl.coef > 0: the adaptive controller scales the "
                                 "coefficient multiplicatively, so it would stay 0 forever")
        if kl.horizon < 1:
            raise ValueError(f"model.kl.horizon={kl.horizon} must be >= 1 (samples; 10000 is usual)")
        for name, value in (("gamma", adv.gamma), ("lam", adv.lam)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"model.advantage.{name}={value} must lie in [0, 1] (1.0 is the CE-PO authors' setting)")
        if not adv.min_std >= 0:
            raise ValueError(f"model.advantage.min_std={adv.min_std} must be >= 0 (0 = off)")
        for option in unread_advantage_options(adv, self.estimator.options):
            readers = [name for name in ADVANTAGE_ESTIMATORS if option in ADVANTAGE_ESTIMATORS[name].options]
            raise ValueError(
                f"model.advantage.{option}={getattr(adv, option)!r} would be ignored: advantage.estimator="
                f"{adv.estimator!r} does not read it (read by: {', '.join(readers)}); leave advantage.{option} at "
                f"its default {_DEFAULT_ADVANTAGE[option]!r} or choose an estimator that reads it"
            )
        if adv.min_std > 0 and adv.scale == "none":
            raise ValueError("model.advantage.min_std floors the std divisor, but advantage.scale is 'none' "
                             "(no divisor); set scale to group or batch, or min_std to 0")
        if self.estimator.needs_critic and self.critic_config is None:
            raise ValueError(
                f"model.advantage.estimator={adv.estimator!r} needs a critic: set model.critic (e.g. "
                "{kind: head}) or choose the grpo, rloo or reinforce_pp estimator"
            )
        if self.critic_config is not None:
            self.critic_config.check()

    def check_training_options(self) -> None:
        """Options that only matter for training (``fit``), refused before the first rollout."""
        check_generation_options(self.generation, training=True)
        if self.estimator.group_relative and self.group_size < 2:
            raise ValueError(
                f"model.group_size={self.group_size} with the group-relative estimator "
                f"model.advantage.estimator={self.advantage.estimator!r}: every advantage would be 0 and "
                "nothing would train; set group_size >= 2 (4-16 is usual) or use reinforce_pp or gae"
            )

    def check_batch_arithmetic(self, prompts_per_step: int) -> None:
        """Prompts per step x G must split evenly into mini-batches and micro-batches."""
        rollout_size = prompts_per_step * self.group_size
        mini = self.mini_batch_size or rollout_size
        problems = []
        if rollout_size % mini:
            problems.append(
                f"a rollout of data.prompts_per_step ({prompts_per_step}) x model.group_size "
                f"({self.group_size}) = {rollout_size} completions does not split into mini-batches of "
                f"model.mini_batch_size={mini}"
            )
        if mini % min(self.micro_batch_size, mini):
            problems.append(
                f"model.mini_batch_size={mini} is not a multiple of model.micro_batch_size="
                f"{self.micro_batch_size}"
            )
        if problems:
            raise ValueError(
                "; ".join(problems) + ". Change data.prompts_per_step, model.group_size, model.mini_batch_size "
                "or model.micro_batch_size so that prompts_per_step * group_size is a multiple of "
                "mini_batch_size and mini_batch_size a multiple of micro_batch_size."
            )
