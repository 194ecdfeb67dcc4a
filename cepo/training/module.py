"""The training loop: rollout -> score -> prepare -> optimise, one LightningModule for every algorithm.

:class:`CEPOModule` is the loop. Per training step (one rollout) it

1. **rolls out** G completions per prompt (:meth:`make_rollout`),
2. **scores** them: every reward term, then the weighted power mean (:meth:`score_rollout`),
3. **prepares** the update (:meth:`prepare`): old and reference log-probs, the critic's values when there
   is a critic, the KL penalty when the KL sits in the reward, and the advantages from the registered
   estimator ``advantage.estimator`` (:mod:`cepo.rl.advantages`),
4. **optimises** (:meth:`optimise`): ``num_iterations`` passes over mini-batches, each accumulated over
   micro-batches, of the registered policy loss plus the KL term (:func:`cepo.rl.losses.policy_objective`)
   and, with a critic, the clipped value loss.

The math is in :mod:`cepo.rl`; the critic is an optional component (:mod:`cepo.training.critic`). GRPO,
RLOO, REINFORCE++ and PPO are the same loop with different defaults (:class:`GRPO`, :class:`RLOO`,
:class:`ReinforcePP`, :class:`PPO`). Optimisation is manual: a rollout runs several optimiser steps, which
Lightning's automatic loop cannot express.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from cepo.answers import AnswerParser, resolve_markers
from cepo.data.datamodule import PromptBatch
from cepo.data.prompts import FAMILIES, render_prompt
from cepo.evaluation.metrics import EvalMetrics, format_table, rollout_faithfulness
from cepo.policy.generation import GenerationConfig, generate_completions
from cepo.policy.loading import REFERENCE_ADAPTER, PolicyConfig, load_policy, load_tokenizer
from cepo.policy.logprobs import batched_logprobs, completion_logprobs, micro_batches
from cepo.rewards.base import AccuracyReward, NetworkReward, RewardFunction, check_reward_values
from cepo.rewards.combiner import normalized_weights, power_mean
from cepo.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimatorName,
    AdvantageInputs,
    kl_penalized_rewards,
    zero_std_fraction,
)
from cepo.rl.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, KLEstimatorName, k1_kl
from cepo.rl.losses import (
    LossAggregationName,
    PolicyLossName,
    clipped_value_loss,
    explained_variance,
    loss_normalizer,
    policy_objective,
)
from cepo.rl.reductions import masked_mean, masked_sum, whiten
from cepo.rollout import Rollout
from cepo.training.critic import CRITIC_ADAPTER, Critic, CriticConfig
from cepo.training.predict import PredictionBatch


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
    scale: Literal["group", "batch", "none"] = "group"
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
    """KL coefficient (initial value when ``target`` is set); CE-PO authors: 0.001. 0 with no ``target``
    skips the reference forward pass."""
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


@dataclass
class PreparedRollout:
    """What :meth:`CEPOModule.prepare` computes once per rollout for the optimisation (no gradients)."""

    mask: torch.Tensor
    """(N, T) completion tokens, float."""
    advantages: torch.Tensor
    """(N,) per sequence or (N, T) per token."""
    returns: torch.Tensor | None = None
    """(N, T) regression targets of the critic (estimators that produce them)."""
    old_logp: torch.Tensor | None = None
    """(N, T) log-probs at rollout time; None when the policy cannot have moved before the loss is taken."""
    ref_logp: torch.Tensor | None = None
    """(N, T) log-probs of the frozen reference; None without a KL term."""
    values: torch.Tensor | None = None
    """(N, T) the critic's values at rollout time."""
    sequence_kl: float = 0.0
    """Mean over sequences of the summed k1 KL to the reference (for the adaptive KL controller)."""


def fold_optimizer_steps(trainer, optimizer_steps_this_rollout: int) -> None:
    """Make ``trainer.global_step`` count rollouts, not optimiser steps: the one place that touches
    Lightning's private progress counters.

    In manual optimisation Lightning advances ``global_step`` on every ``optimizer.step()``, while
    ``val_check_interval`` counts batches; with several mini-batches or iterations per rollout the two would
    drift apart and ``max_steps`` would mean a different thing for GRPO and PPO. Rescaling the public
    ``fit_loop.max_steps`` instead would make ``global_step``, the progress bar's total and
    ``every_n_train_steps`` count optimiser steps, so cepo keeps one step = one rollout by taking back every
    optimiser step after the first of a rollout (``train/optimizer_steps`` logs the other count). Called
    after each optimiser step, so the counter never overshoots mid-rollout. ``test_step_counting.py``
    fails loudly if a Lightning upgrade moves or changes these counters.
    """
    if optimizer_steps_this_rollout > 1:
        progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.total
        progress.ready -= 1
        progress.completed -= 1


class CEPOModule(LightningModule):
    """The RL training loop shared by every algorithm; its components are chosen by name in the config."""

    algorithm = "cepo"

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        generation: GenerationConfig = GenerationConfig(),
        optim: OptimConfig = OptimConfig(),
        prompt: PromptConfig = PromptConfig(),
        rewards: list[RewardFunction] | None = None,
        reward_p: float = 1.0,
        reward_weights: dict[str, float] | None = None,
        advantage: AdvantageConfig = AdvantageConfig(),
        loss: PolicyLossConfig = PolicyLossConfig(),
        kl: KLConfig = KLConfig(),
        critic: CriticConfig | None = None,
        group_size: int = 4,
        mini_batch_size: int | None = None,
        micro_batch_size: int = 8,
        num_iterations: int = 1,
        completions_to_log: int = 4,
        eval_num_samples: int = 1,
    ) -> None:
        """
        Args:
            policy: Model, tokenizer and LoRA settings.
            generation: Sampling settings for rollouts and evaluation.
            optim: Optimiser and learning-rate schedule.
            prompt: Prompt template and answer marker.
            rewards: Reward functions (``class_path``/``init_args``); each adds one named, weighted term.
                Rewards that need the network (``NetworkReward``, e.g. ``CoherenceRewardCallback``) are
                trainer callbacks and add more terms. Default: accuracy only. An overlay config adds to
                this list with ``rewards+:`` (a plain ``rewards:`` replaces it).
            reward_p: Exponent p of the weighted power mean that fuses the terms (DESIGN §5): 1 =
                weighted mean, 0 = geometric mean, < 1 concave (coherence cannot buy back a wrong answer).
            reward_weights: Weight overrides by term name (``{accuracy: 0.7}``), applied to every term,
                whichever reward attached it; lets an overlay re-weight terms without replacing the list.
                A name that no reward produces is an error.
            advantage: Advantage estimator and its options.
            loss: Policy loss, clip ranges and aggregation.
            kl: KL to the reference: coefficient, placement (loss or reward), estimator, adaptive target.
            critic: Value model (None = no critic). Required by ``advantage.estimator: gae``.
            group_size: Samples per prompt (G). All G samples of a prompt stay on one device.
            mini_batch_size: Completions per optimiser step (None = the whole rollout, one step).
            micro_batch_size: Completions per forward/backward pass (gradient accumulation inside a
                mini-batch; also the chunk size of the no-grad log-prob passes).
            num_iterations: Passes over each rollout (mu in GRPO, PPO epochs), reusing stored old log-probs.
            completions_to_log: Completions written to TensorBoard as text per logged step (0 = none).
            eval_num_samples: Completions per prompt in validation/test. 1 with ``eval_temperature`` 0 is
                greedy pass@1; n > 1 (needs ``generation.eval_temperature`` > 0) reports ``accuracy`` as
                the mean over n samples and ``pass_at_n`` as the fraction of prompts with any right one.
        """
        super().__init__()
        self.automatic_optimization = False
        # Copies: the defaults are shared instances (so --help can list their fields).
        self.policy_config = copy.deepcopy(policy)
        self.generation = copy.deepcopy(generation)
        self.optim = copy.deepcopy(optim)
        self.prompt = copy.deepcopy(prompt)
        self.advantage = copy.deepcopy(advantage)
        self.loss = copy.deepcopy(loss)
        self.kl = copy.deepcopy(kl)
        self.critic_config = copy.deepcopy(critic)
        self.reward_functions = list(rewards) if rewards is not None else [AccuracyReward()]
        self.reward_p = float(reward_p)
        self.reward_weights = dict(reward_weights or {})
        self.group_size = group_size
        self.mini_batch_size = mini_batch_size
        self.micro_batch_size = micro_batch_size
        self.num_iterations = num_iterations
        self.completions_to_log = completions_to_log
        self.eval_num_samples = eval_num_samples
        self.parser = AnswerParser(resolve_markers(self.prompt.marker, self.prompt.parse_markers))
        self.estimator = ADVANTAGE_ESTIMATORS[self.advantage.estimator]
        self._check_static_options()
        if self.kl.target is None:
            self.kl_controller = FixedKLController(self.kl.coef)
        else:
            self.kl_controller = AdaptiveKLController(self.kl.coef, self.kl.target, self.kl.horizon)
        # No save_hyperparameters(): LightningCLI writes the full config.yaml next to the logs, and
        # hyper-parameters inside checkpoints would override the command line on `--ckpt_path`.
        self.policy = None
        self.tokenizer = None
        self.critic: Critic | None = None
        self.has_reference_adapter = False
        self.rollout_step = 0  # rollouts trained on; the data position and seeds derive from it
        self._optimizer_steps = 0
        self._steps_this_rollout = 0
        self._eval_metrics: dict[str, EvalMetrics] = {}
        self._pending_rng: dict | None = None
        self.last_val_metrics: dict[str, float] = {}  # the latest validation, for the HParams tab

    # ------------------------------------------------------------------ setup and validation of options
    def _check_static_options(self) -> None:
        names = [r.name for r in self.reward_functions]
        if len(set(names)) != len(names):
            raise ValueError(f"model.rewards has duplicate names {names}; set `name` on each reward")
        for name, weight in self.reward_weights.items():
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"model.reward_weights[{name!r}]={weight} must be a finite number >= 0")
        if self.group_size < 1 or self.micro_batch_size < 1 or self.num_iterations < 1:
            raise ValueError("model.group_size, model.micro_batch_size and model.num_iterations must be >= 1")
        if self.eval_num_samples < 1:
            raise ValueError("model.eval_num_samples must be >= 1")
        if self.eval_num_samples > 1 and self.generation.eval_temperature <= 0:
            raise ValueError(
                f"model.eval_num_samples={self.eval_num_samples} samples identical greedy completions; set "
                "model.generation.eval_temperature > 0 (e.g. 0.6) or eval_num_samples to 1"
            )
        if self.generation.max_new_tokens < 1:
            raise ValueError(
                f"model.generation.max_new_tokens={self.generation.max_new_tokens}: a completion needs at least "
                "one token; set it to the longest answer you expect (e.g. 256)"
            )
        if self.generation.eval_max_new_tokens is not None and self.generation.eval_max_new_tokens < 1:
            raise ValueError(
                f"model.generation.eval_max_new_tokens={self.generation.eval_max_new_tokens} must be >= 1, or "
                "null to use max_new_tokens"
            )
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
        if adv.estimator != "grpo" and (adv.min_std > 0 or adv.per_term):
            raise ValueError(
                f"model.advantage.min_std and model.advantage.per_term apply to the grpo estimator only; "
                f"advantage.estimator is {adv.estimator!r}"
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
        if not self.generation.temperature > 0:
            raise ValueError(
                f"model.generation.temperature={self.generation.temperature}: training samples G completions "
                "per prompt and scores their log-probs at this temperature, so it must be > 0 (1.0 is "
                "usual); greedy decoding is for evaluation (model.generation.eval_temperature: 0)"
            )
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

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self.tokenizer = load_tokenizer(self.policy_config)
        self.policy, self.has_reference_adapter = load_policy(self.policy_config)
        self.policy.train()  # from_pretrained returns eval mode; generation switches modes itself
        if self.critic_config is not None:
            self.critic = Critic(self.critic_config, self.policy)
            self.critic.add_adapter(self.policy, self.policy_config.lora)
            self.freeze_inactive_adapters()

    def setup(self, stage: str) -> None:
        self.check_reward_callbacks()
        if stage != "fit":
            return
        self.check_training_options()
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "prompts_per_step"):
            self.check_batch_arithmetic(datamodule.prompts_per_step)
        weighted = {r.name: self.reward_weights.get(r.name, r.weight) for r in self.reward_functions}
        if sum(weighted.values()) == 0 and not self.network_rewards():
            raise ValueError(
                f"every reward has weight 0 ({weighted}) and no reward callback is configured: nothing to "
                "optimise; give at least one reward a weight > 0 (its init_args.weight, or model.reward_weights)"
            )

    def check_reward_callbacks(self) -> None:
        """Refuse a callback that looks like a reward but does not declare itself one: it would be skipped
        silently, since rewards are found by type."""
        for callback in self.trainer.callbacks if self._trainer else []:
            looks_like_reward = hasattr(callback, "on_rollout_batch") or hasattr(callback, "score_rollout")
            if looks_like_reward and not isinstance(callback, NetworkReward):
                raise TypeError(
                    f"trainer.callbacks holds {type(callback).__name__}, which looks like a reward but is not a "
                    "cepo.NetworkReward; subclass cepo.NetworkReward and implement "
                    "score_rollout(module, rollout, step) (the old on_rollout_batch hook is no longer called)"
                )

    def network_rewards(self) -> list[NetworkReward]:
        """The trainer's callbacks that are rewards needing the network (found by type)."""
        return [cb for cb in self.trainer.callbacks if isinstance(cb, NetworkReward)] if self._trainer else []

    # ------------------------------------------------------------------ networks
    @contextmanager
    def reference_model(self):
        """The frozen reference network: the starting adapter's frozen copy if the run started from an
        adapter, otherwise the base model (adapter disabled). No second copy of the base weights."""
        if self.has_reference_adapter:
            self.policy.set_adapter(REFERENCE_ADAPTER)
            try:
                yield self.policy
            finally:
                self.policy.set_adapter("default")
                self.freeze_inactive_adapters()
        else:
            with self.policy.disable_adapter():
                yield self.policy

    def freeze_inactive_adapters(self) -> None:
        # set_adapter() toggles requires_grad per adapter; keep only the trained adapters trainable.
        trained = (".default.", f".{CRITIC_ADAPTER}.") if self.critic is not None and self.critic.separate else (".default.",)
        for name, param in self.policy.named_parameters():
            if "lora_" in name:
                param.requires_grad_(any(key in name for key in trained))

    @contextmanager
    def critic_adapter(self):
        """Run the ``critic`` adapter instead of the policy's (``critic.kind: separate``)."""
        with self.critic.adapter(self.policy, self.freeze_inactive_adapters) as network:
            yield network

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise ValueError("no trainable parameters: check policy.lora.target_modules matches the model's layers")
        groups: list[dict] = [{"params": params, "lr": self.optim.lr}]
        if self.critic is not None and self.critic_config.lr is not None:
            # The value parameters in a group of their own, same optimiser and schedule.
            critic_ids = {id(p) for p in self.critic.parameters_of(self.policy)}
            groups = [
                {"params": [p for p in params if id(p) not in critic_ids], "lr": self.optim.lr},
                {"params": [p for p in params if id(p) in critic_ids], "lr": self.critic_config.lr},
            ]
        optimizer = torch.optim.AdamW(
            groups if len(groups) > 1 else params, lr=self.optim.lr, betas=tuple(self.optim.betas),
            eps=self.optim.eps, weight_decay=self.optim.weight_decay,
        )
        total = self._total_optimizer_steps()
        warmup, kind = self.optim.warmup_steps, self.optim.scheduler

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if kind == "constant" or total is None:
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

        if kind != "constant" and total is None:
            raise ValueError(f"model.optim.scheduler={kind!r} needs trainer.max_steps to know when to reach 0")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_optimizer_steps(self) -> int | None:
        if not self._trainer or self.trainer.max_steps is None or self.trainer.max_steps < 0:
            return None
        datamodule = getattr(self.trainer, "datamodule", None)
        prompts = getattr(datamodule, "prompts_per_step", None)
        if prompts is None:
            return None
        rollout_size = prompts * self.group_size
        per_rollout = (rollout_size // (self.mini_batch_size or rollout_size)) * self.num_iterations
        return self.trainer.max_steps * per_rollout

    # ------------------------------------------------------------------ rollouts
    def render_prompts(self, examples) -> list[str]:
        return [
            render_prompt(
                ex, family=None if self.prompt.template == "auto" else self.prompt.template,
                tokenizer=self.tokenizer, use_chat_template=self.prompt.use_chat_template,
                marker=self.prompt.marker, system_prompt=self.prompt.system_prompt,
            )
            for ex in examples
        ]

    def make_rollout(self, batch: PromptBatch, stage: str) -> Rollout:
        """Generate completions for the batch's prompts and parse them into X and Y."""
        train = stage == "train"
        group = self.group_size if train else self.eval_num_samples
        prompts = self.render_prompts(batch.examples)
        gen = self.generation
        generated = generate_completions(
            self.policy, self.tokenizer, prompts, group,
            max_new_tokens=gen.max_new_tokens if train else (gen.eval_max_new_tokens or gen.max_new_tokens),
            temperature=gen.temperature if train else gen.eval_temperature,
            top_p=gen.top_p if train else 1.0, top_k=gen.top_k if train else 0,
            max_prompt_tokens=gen.max_prompt_tokens,
        )
        completions = self.tokenizer.batch_decode(generated.completion_ids, skip_special_tokens=True)
        parsed = [self.parser(text) for text in completions]
        rows = [ex for ex in batch.examples for _ in range(group)]
        return Rollout(
            examples=rows,
            prompts=[p for p in prompts for _ in range(group)],
            completions=completions,
            rationales=[p.rationale for p in parsed],
            answers=[p.answer for p in parsed],
            marker_found=torch.tensor([p.marker_found for p in parsed], dtype=torch.bool),
            group_size=group,
            prompt_ids=generated.prompt_ids,
            prompt_mask=generated.prompt_mask,
            completion_ids=generated.completion_ids,
            completion_mask=generated.completion_mask,
            truncated=generated.truncated,
            stage=stage,
        )

    def attach_reward_terms(self, rollout: Rollout) -> None:
        """Every reward term: the configured functions, then the rewards that need the network (the
        coherence reward), which decide themselves whether to score evaluation rollouts. Each receives the
        rollout step. Values must be finite and in [0, 1] (the combiner's domain)."""
        start = time.perf_counter()
        for fn in self.reward_functions:
            rollout.add_reward(fn.name, fn(rollout), fn.weight)
        rollout.stats["time/rewards_s"] = time.perf_counter() - start
        for reward in self.network_rewards():
            reward.score_rollout(self, rollout, self.rollout_step)
        for name, values in rollout.rewards.items():
            check_reward_values(name, values)
        for name, weight in self.reward_weights.items():
            if name in rollout.rewards:
                rollout.reward_weights[name] = float(weight)
            elif rollout.stage == "train":
                raise ValueError(
                    f"model.reward_weights names {name!r}, but no reward produces that term; the terms are "
                    f"{sorted(rollout.rewards)}"
                )

    def score_rollout(self, rollout: Rollout) -> torch.Tensor:
        """Every reward term fused by the weighted power mean. Returns the fused reward ``(N,)`` and
        stores it as ``rollout.rewards['reward']``."""
        self.attach_reward_terms(rollout)
        names = list(rollout.rewards)
        weights = torch.tensor([rollout.reward_weights[n] for n in names])
        if float(weights.sum()) <= 0:
            raise ValueError(f"all reward terms {names} have weight 0; give at least one a positive weight")
        values = torch.stack([rollout.rewards[n] for n in names], dim=1)  # (N, terms)
        fused = power_mean(values, weights, self.reward_p)
        rollout.rewards["reward"] = fused
        return fused

    # ------------------------------------------------------------------ training
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        step_start = time.perf_counter()
        times = {}
        start = time.perf_counter()
        rollout = self.make_rollout(batch, "train")
        times["time/generate_s"] = time.perf_counter() - start
        start = time.perf_counter()
        rewards = self.score_rollout(rollout)
        times["time/score_s"] = time.perf_counter() - start
        start = time.perf_counter()
        self._steps_this_rollout = 0
        prepared, stats = self.prepare(rollout, rewards.to(self.device))
        stats.update(self.optimise(rollout, prepared))
        self.kl_controller.update(prepared.sequence_kl, len(rollout) * self.trainer.world_size)
        times["time/update_s"] = time.perf_counter() - start
        self.rollout_step += 1
        times["time/step_s"] = time.perf_counter() - step_start
        self.log_rollout(rollout, {**stats, **times}, prepared.advantages)

    def _logprob_temperature(self) -> float:
        # Log-probs divide the logits by the sampling temperature; 0 would turn every weight into NaN.
        temperature = self.generation.temperature
        if not temperature > 0:
            raise ValueError(f"model.generation.temperature={temperature} must be > 0 for training")
        return temperature

    @torch.no_grad()
    def rollout_logprobs_and_values(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Old log-probs (B, T) of the rollout and, with a critic, its values (B, T); no gradients."""
        temperature = self._logprob_temperature()
        if self.critic is None or self.critic.separate:
            logp, _ = batched_logprobs(self.policy, tensors, self.micro_batch_size, temperature)
            if self.critic is None:
                return logp, None
            with self.critic_adapter():
                values = torch.cat([
                    self.critic.values(self.policy, *(t[rows] for t in tensors))
                    for rows in micro_batches(tensors[0].shape[0], self.micro_batch_size)
                ])
            return logp, values
        logps, values = [], []
        for rows in micro_batches(tensors[0].shape[0], self.micro_batch_size):
            logp, _, hidden = completion_logprobs(self.policy, *(t[rows] for t in tensors),
                                                  temperature=temperature, return_hidden=True)
            logps.append(logp)
            values.append(self.critic.value_head(hidden))
        return torch.cat(logps), torch.cat(values)

    def prepare(self, rollout: Rollout, scores: torch.Tensor) -> tuple[PreparedRollout, dict[str, float]]:
        """Everything the optimisation needs, computed once per rollout without gradients: old and
        reference log-probs, values, token rewards, advantages (and returns for the critic)."""
        tensors = self.rollout_tensors(rollout)
        mask = rollout.completion_mask.float()
        temperature = self._logprob_temperature()
        kl_coef = self.kl_controller.value
        stats: dict[str, float] = {}
        need_ref = kl_coef > 0 or self.kl.target is not None
        # With one optimiser step per rollout and no critic the policy has not moved when the loss is taken,
        # so the current log-probs (detached) are the old ones and that forward pass is skipped.
        need_old = (self.num_iterations > 1 or len(self.minibatch_rows(len(rollout))) > 1
                    or self.critic is not None or (need_ref and self.kl.placement == "reward")
                    or self.kl.target is not None)
        start = time.perf_counter()
        ref_logp = None
        if need_ref:
            with self.reference_model() as reference:
                ref_logp, _ = batched_logprobs(reference, tensors, self.micro_batch_size, temperature)
        stats["time/reference_s"] = time.perf_counter() - start
        start = time.perf_counter()
        old_logp, values = self.rollout_logprobs_and_values(tensors) if need_old else (None, None)
        if self.critic is not None:
            stats["time/values_s"] = time.perf_counter() - start
        global_sum = self.global_sum if self._world_size() > 1 else None

        token_rewards = None
        sequence_kl = 0.0
        if old_logp is not None and ref_logp is not None:
            k1 = k1_kl(old_logp, ref_logp)  # (B, T)
            sequence_kl = stats["kl_sequence"] = self._global_mean(masked_sum(k1, mask, dim=-1).mean())
        if self.estimator.needs_token_rewards:
            in_reward = self.kl.placement == "reward" and ref_logp is not None
            kl = (self._kl_estimator()(old_logp, ref_logp) if in_reward else torch.zeros_like(mask))
            token_rewards = kl_penalized_rewards(scores, kl, mask, kl_coef if in_reward else 0.0)
        names = [n for n in rollout.rewards if n != "reward"]
        inputs = AdvantageInputs(
            scores=scores, mask=mask, group_size=self.group_size, token_rewards=token_rewards, values=values,
            terms=torch.stack([rollout.rewards[n] for n in names], dim=1).to(scores.device) if self.advantage.per_term else None,
            term_weights=normalized_weights([rollout.reward_weights[n] for n in names], len(names)) if self.advantage.per_term else None,
            global_sum=global_sum,
        )
        adv = self.advantage
        advantages, returns = self.estimator.compute(inputs, scale=adv.scale, min_std=adv.min_std,
                                                     per_term=adv.per_term, gamma=adv.gamma, lam=adv.lam)
        if returns is not None and values is not None:
            stats.update(self._target_stats(advantages, returns, values, mask))
        if adv.whiten:
            token_level = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(mask)
            advantages = whiten(token_level, mask, global_sum=global_sum or (lambda x: x))
        if advantages.dim() == 1:
            stats["advantage_abs_mean"] = float(advantages.abs().mean())
        else:
            stats["advantage_abs_mean"] = float(masked_mean(advantages.abs(), mask))
        prepared = PreparedRollout(mask=mask, advantages=advantages, returns=returns, old_logp=old_logp,
                                   ref_logp=ref_logp, values=values, sequence_kl=sequence_kl)
        return prepared, stats

    def _kl_estimator(self):
        return KL_ESTIMATORS[self.kl.resolved_estimator()]

    def optimise(self, rollout: Rollout, prepared: PreparedRollout) -> dict[str, float]:
        """``num_iterations`` passes over the mini-batches; one optimiser step per mini-batch, accumulated
        over micro-batches. Returns the mean of each statistic over the optimiser steps."""
        mask, old_logp, ref_logp = prepared.mask, prepared.old_logp, prepared.ref_logp
        advantages, returns, old_values = prepared.advantages, prepared.returns, prepared.values
        temperature = self._logprob_temperature()
        kl_in_loss = self.kl.placement == "loss"
        kl_coef = self.kl_controller.value if kl_in_loss else 0.0
        # With the KL in the reward, the loss still reports k3 as a monitor.
        kl_estimator = self.kl.resolved_estimator() if kl_in_loss else "k3"
        world = self._world_size()
        critic = self.critic
        totals: dict[str, list[float]] = {}
        for _ in range(self.num_iterations):
            for rows in self.minibatch_rows(len(rollout)):
                normalizer = self.global_sum(loss_normalizer(mask[rows], self.loss.aggregation,
                                                             self.generation.max_new_tokens))
                step_stats: list[dict[str, torch.Tensor]] = []

                def micro_losses(rows=rows, normalizer=normalizer, step_stats=step_stats):
                    for micro in micro_batches(rows.stop - rows.start, self.micro_batch_size):
                        sub = slice(rows.start + micro.start, rows.start + micro.stop)
                        part = self.rollout_tensors(rollout, sub)
                        logp, entropy, hidden = completion_logprobs(
                            self.policy, *part, temperature=temperature, with_entropy=True,
                            return_hidden=critic is not None and not critic.separate,
                        )
                        old = old_logp[sub] if old_logp is not None else logp.detach()
                        policy_loss, s = policy_objective(
                            logp, old, advantages[sub], mask[sub], policy_loss=self.loss.name,
                            epsilon=self.loss.epsilon, epsilon_high=self.loss.epsilon_high, kl_coef=kl_coef,
                            ref_logp=ref_logp[sub] if ref_logp is not None else None, kl_estimator=kl_estimator,
                            aggregation=self.loss.aggregation, max_completion_length=self.generation.max_new_tokens,
                            normalizer=normalizer,
                        )
                        s["entropy"] = masked_mean(entropy, mask[sub])
                        # Report global values: DDP averages the parts scaled by the global normaliser.
                        s["policy_loss"] = s["policy_loss"] * world
                        s["loss"] = policy_loss.detach() * world
                        if critic is None:
                            step_stats.append(s)
                            yield policy_loss
                            continue
                        s["approx_kl"] = masked_mean(0.5 * (logp.detach() - old) ** 2, mask[sub])

                        def value_loss_of(values, s=s, sub=sub, policy_loss=policy_loss):
                            loss, clip_fraction = clipped_value_loss(
                                values, old_values[sub], returns[sub], mask[sub], critic.config.value_clip,
                                normalizer=normalizer,
                            )
                            s["value_clip_fraction"] = clip_fraction
                            s["value_loss"] = loss.detach() * world
                            s["loss"] = (policy_loss.detach() + critic.config.value_coef * loss.detach()) * world
                            return critic.config.value_coef * loss

                        if not critic.separate:
                            loss = policy_loss + value_loss_of(critic.value_head(hidden))
                            step_stats.append(s)
                            yield loss
                        else:
                            yield policy_loss
                            with self.critic_adapter():
                                value_loss = value_loss_of(critic.values(self.policy, *part))
                                step_stats.append(s)
                                yield value_loss  # backward runs here, with the critic adapter active

                grad_norm = self.optimizer_step_with_accumulation(micro_losses())
                totals.setdefault("grad_norm", []).append(grad_norm)
                for key in step_stats[0]:
                    values = torch.stack([s[key].float() for s in step_stats])
                    # the losses are normalised by the whole mini-batch: micro-batch parts add up
                    summed = key in ("loss", "policy_loss", "value_loss")
                    totals.setdefault(key, []).append(float(values.sum() if summed else values.mean()))
        return {key: sum(v) / len(v) for key, v in totals.items()}

    @staticmethod
    @torch.no_grad()
    def _target_stats(advantages, returns, values, mask) -> dict[str, float]:
        def mean_std(x):
            mean = masked_mean(x, mask)
            return float(mean), float(masked_mean((x - mean) ** 2, mask).sqrt())

        advantage_mean, advantage_std = mean_std(advantages)
        return_mean, return_std = mean_std(returns)
        return {
            "advantage_mean": advantage_mean, "advantage_std": advantage_std,
            "return_mean": return_mean, "return_std": return_std,
            "value_mean": float(masked_mean(values, mask)),
            "explained_variance": float(explained_variance(values, returns, mask)),
        }

    def rollout_tensors(self, rollout: Rollout, rows=slice(None)):
        return (rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.completion_ids[rows],
                rollout.completion_mask[rows])

    def minibatch_rows(self, n: int) -> list[slice]:
        return micro_batches(n, self.mini_batch_size or n)

    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over devices (identity on one device): loss normalisers and batch statistics must count the
        global batch so that DDP reproduces the single-device update."""
        if self._world_size() > 1:
            value = self.trainer.strategy.reduce(value.float(), reduce_op="sum")
        return value

    def _global_mean(self, value: torch.Tensor) -> float:
        if self._world_size() > 1:
            value = self.trainer.strategy.reduce(value.float(), reduce_op="mean")
        return float(value)

    def optimizer_step_with_accumulation(self, micro_losses) -> float:
        """Backward each micro-batch loss (a generator, so graphs are freed one at a time), clip, step.
        Returns the pre-clip gradient norm."""
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        for loss in micro_losses:
            # DDP averages gradients over devices; the normalisers are global sums, so undo the average.
            self.manual_backward(loss * self.trainer.world_size)
        optimizer.step()  # measures and clips in on_before_optimizer_step
        grad_norm = self._pre_clip_grad_norm
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        self._optimizer_steps += 1
        self._steps_this_rollout += 1
        fold_optimizer_steps(self.trainer, self._steps_this_rollout)
        return grad_norm

    def on_before_optimizer_step(self, optimizer) -> None:
        # Under 16-mixed Lightning unscales the gradients just before this hook, so the norm and the clip
        # see the true gradients, not the loss-scaled ones.
        self._pre_clip_grad_norm = self._grad_norm()
        if self.optim.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.optim.max_grad_norm, gradient_clip_algorithm="norm")

    def _grad_norm(self) -> float:
        grads = [p.grad.detach().float().norm() for p in self.trainable_parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0

    # ------------------------------------------------------------------ logging
    def log_rollout(self, rollout: Rollout, stats: dict[str, float], advantages: torch.Tensor | None = None) -> None:
        mask = rollout.completion_mask.float()
        lengths = mask.sum(-1)
        metrics: dict[str, float] = {}
        for name, values in rollout.rewards.items():
            key = "reward" if name == "reward" else f"rewards/{name}"
            metrics[f"{key}_mean"] = float(values.mean())
            metrics[f"{key}_std"] = float(values.std()) if len(values) > 1 else 0.0
        metrics["zero_std_groups"] = float(zero_std_fraction(rollout.rewards["reward"], rollout.group_size))
        metrics["completion/length_mean"] = float(lengths.mean())
        metrics["completion/length_max"] = float(lengths.max())
        metrics["completion/truncated"] = float(rollout.truncated.float().mean())
        metrics["completion/marker_found"] = float(rollout.marker_found.float().mean())
        metrics["lr"] = float(self.lr_schedulers().get_last_lr()[0])
        metrics["optimizer_steps"] = float(self._optimizer_steps)
        metrics["kl_coef"] = float(self.kl_controller.value)
        metrics.update({k: float(v) for k, v in rollout.stats.items()})
        metrics.update({k: float(v) for k, v in stats.items()})
        metrics.update({f"rollouts/{k}": v for k, v in rollout_faithfulness(rollout).items()})
        values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            values = self.trainer.strategy.reduce(values, reduce_op="mean")
        logged = dict(zip(metrics, values.tolist()))
        self.log_dict({f"train/{k}": v for k, v in logged.items()}, on_step=True, on_epoch=False, sync_dist=False)
        self.log("rollout_step", float(self.rollout_step), on_step=True, on_epoch=False)
        # The progress bar: reward, accuracy (when an accuracy term exists) and seconds per rollout step.
        self.log("reward", logged["reward_mean"], prog_bar=True, logger=False, on_step=True, on_epoch=False)
        if "rewards/accuracy_mean" in logged:
            self.log("acc", logged["rewards/accuracy_mean"], prog_bar=True, logger=False, on_step=True, on_epoch=False)
        if "time/step_s" in logged:
            self.log("s/step", logged["time/step_s"], prog_bar=True, logger=False, on_step=True, on_epoch=False)
        self.log("train/reward", logged["reward_mean"], on_step=True, on_epoch=False)
        row_advantages = self._row_advantages(advantages, mask) if advantages is not None else None
        self._log_rollout_tables(rollout, row_advantages)

    @staticmethod
    def _row_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One advantage per row: the sequence's own, or the mean over its completion tokens (N,)."""
        if advantages.dim() == 1:
            return advantages.detach().float().cpu()
        return masked_mean(advantages.detach().float(), mask, dim=-1).cpu()

    @rank_zero_only
    def _log_rollout_tables(self, rollout: Rollout, advantages: torch.Tensor | None) -> None:
        """Every ``log_every_n_steps`` rollouts: histograms of each reward term and of the advantages, and
        the first ``completions_to_log`` completions as a text table with every term and the advantage."""
        every = max(1, self.trainer.log_every_n_steps)
        if self.rollout_step % every:
            return
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None:
            return
        if hasattr(experiment, "add_histogram"):
            for name, values in rollout.rewards.items():
                experiment.add_histogram(f"train/{'reward' if name == 'reward' else 'rewards/' + name}",
                                         values.float(), global_step=self.rollout_step)
            if advantages is not None:
                experiment.add_histogram("train/advantage", advantages, global_step=self.rollout_step)
        if not self.completions_to_log or not hasattr(experiment, "add_text"):
            return
        names = list(rollout.rewards)
        columns = names + (["advantage"] if advantages is not None else [])
        header = "| prompt | completion | answer | gold | " + " | ".join(columns) + " |"
        lines = [header, "|" + "---|" * (4 + len(columns))]
        for i in range(min(self.completions_to_log, len(rollout))):
            cells = [rollout.prompts[i], rollout.completions[i], rollout.answers[i], " / ".join(rollout.examples[i].gold)]
            cells = [c.replace("|", "\\|").replace("\n", "⏎")[-300:] for c in cells]
            cells += [f"{float(rollout.rewards[n][i]):.3f}" for n in names]
            if advantages is not None:
                cells.append(f"{float(advantages[i]):+.3f}")
            lines.append("| " + " | ".join(cells) + " |")
        experiment.add_text("completions", "\n".join(lines), global_step=self.rollout_step)

    # ------------------------------------------------------------------ evaluation
    def _eval_start(self, stage: str) -> None:
        names = self.trainer.datamodule.eval_names(stage) if hasattr(self.trainer.datamodule, "eval_names") else []
        self._eval_metrics = {name: EvalMetrics().to(self.device) for name in names}

    def on_validation_epoch_start(self) -> None:
        self._eval_start("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start("test")

    def _eval_step(self, batch: PromptBatch) -> None:
        rollout = self.make_rollout(batch, "eval")
        self.attach_reward_terms(rollout)  # for logging only: no fusion, no update
        self._eval_metrics[batch.source].update(rollout)

    def validation_step(self, batch: PromptBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def test_step(self, batch: PromptBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def predict_step(self, batch: PromptBatch, batch_idx: int, dataloader_idx: int = 0) -> PredictionBatch:
        """``cepo predict``: the completions, decoded as in validation; ``PredictionWriter`` writes them."""
        return PredictionBatch(self.make_rollout(batch, "predict"), batch.source)

    def _eval_end(self, stage: str) -> dict[str, dict[str, float]]:
        results = {name: metric.compute() for name, metric in self._eval_metrics.items()}
        datamodule = getattr(self.trainer, "datamodule", None)
        sources = getattr(datamodule, "test_sources" if stage == "test" else "val_sources", [])
        for source in sources:  # malformed rows skipped at load (on_error: skip), so no one misses them
            if source.name in results and source.skipped:
                results[source.name]["skipped"] = float(source.skipped)
        flat = {}
        for name, values in results.items():
            for key, value in values.items():
                flat[f"{stage}/{name}/{key}"] = value
        if results:
            accuracies = [v["accuracy"] for v in results.values() if "accuracy" in v]
            flat[f"{stage}/accuracy"] = sum(accuracies) / len(accuracies)
        for key, value in flat.items():
            self.log(key, value, sync_dist=False, add_dataloader_idx=False)
        if not self.trainer.sanity_checking:
            self._report(stage, results, self.run_dir())
            if stage == "val":
                self.last_val_metrics = {key: float(value) for key, value in flat.items()}
        return results

    def run_dir(self) -> Path:
        """The run's log folder. Call on every rank: ``trainer.log_dir`` broadcasts, so reading it inside
        rank-zero-only code would leave the other ranks out of a collective and hang DDP."""
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    @rank_zero_only
    def _report(self, stage: str, results: dict[str, dict[str, float]], run_dir: Path) -> None:
        rank_zero_info(format_table(stage, results, step=self.rollout_step))
        path = run_dir / f"{stage}_results.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            for name, values in results.items():
                handle.write(json.dumps({"stage": stage, "dataset": name, "rollout_step": self.rollout_step, **values}) + "\n")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, *args, **kwargs):
        # Only trainable weights: the frozen base model is reloaded from policy.name_or_path, so a
        # checkpoint of a 7B run stays megabytes, not gigabytes.
        full = super().state_dict(*args, **kwargs)
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        prefix = kwargs.get("prefix", "")
        return type(full)((k, v) for k, v in full.items() if k[len(prefix):] in trainable)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        missing = sorted(trainable - set(state_dict))
        unexpected = sorted(set(state_dict) - {name for name, _ in self.named_parameters()})
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"checkpoint does not match this model: missing {missing[:5]}, unexpected {unexpected[:5]}. "
                "Resume with the same policy.name_or_path, adapter and LoRA settings as the run that wrote it."
            )
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cepo"] = {
            "rollout_step": self.rollout_step,
            "optimizer_steps": self._optimizer_steps,
            "algorithm": self.algorithm,
            "rng": _rng_state(),
            "kl_controller": {"kind": self._kl_controller_kind(), **self.kl_controller.state_dict()},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("cepo")
        if state is None:
            raise ValueError("this checkpoint was not written by cepo (no 'cepo' section); cannot resume from it")
        if state.get("algorithm") != self.algorithm:
            raise ValueError(
                f"checkpoint was written by algorithm {state.get('algorithm')!r}, this run is {self.algorithm!r}; "
                "resume it with the model.class_path of the run that wrote it, or start this run without "
                "--ckpt_path (policy.adapter_path starts from a trained adapter)"
            )
        self.rollout_step = int(state["rollout_step"])
        self._optimizer_steps = int(state.get("optimizer_steps", 0))
        self._pending_rng = state.get("rng")
        saved = state.get("kl_controller")
        if saved is None:
            return
        kind = self._kl_controller_kind()
        if saved["kind"] != kind:
            rank_zero_warn(f"the checkpoint's KL controller is {saved['kind']}, this run's is {kind} "
                           f"(model.kl.target): keeping this run's kl coefficient {self.kl_controller.value}")
        elif kind == "adaptive":  # a fixed coefficient comes from this run's configuration, as the target does
            self.kl_controller.load_state_dict(saved)

    def _kl_controller_kind(self) -> str:
        return "fixed" if isinstance(self.kl_controller, FixedKLController) else "adaptive"

    def on_train_start(self) -> None:
        # Restore RNG streams as late as possible, so nothing between loading and the first step
        # consumes them and the resumed run samples exactly what the uninterrupted one would have.
        rng, self._pending_rng = self._pending_rng, None
        if rng:
            _set_rng_state(rng)

    def on_fit_end(self) -> None:
        self.export_adapter(str(self.run_dir() / "adapter"))

    @rank_zero_only
    def export_adapter(self, path: str) -> None:
        """Write the trained LoRA adapter in PEFT format (``PeftModel.from_pretrained`` loads it) and the
        tokenizer to ``path`` (``fit`` writes ``<log_dir>/adapter``); with a critic also
        ``value_head.safetensors`` and, for ``critic.kind: separate``, the critic adapter in ``critic/``."""
        target = Path(path)
        self.policy.save_pretrained(str(target), selected_adapters=["default"])
        self.tokenizer.save_pretrained(str(target))
        rank_zero_info(f"LoRA adapter written to {target}")
        if self.critic is not None:
            self.critic.export(self.policy, target)
            rank_zero_info(f"value head written to {target}")


def _rng_state() -> dict[str, Any]:
    """Every RNG stream a step draws from, in types that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class GRPO(CEPOModule):
    """Group Relative Policy Optimization (Shao et al. 2024): G samples per prompt, advantages z-scored
    within each group, clipped surrogate (optionally asymmetric, DAPO), k3 KL to the reference as a loss
    term, no critic. The loop of :class:`CEPOModule` with these defaults."""

    algorithm = "grpo"

    def __init__(
        self,
        advantage: AdvantageConfig = AdvantageConfig(estimator="grpo"),
        kl: KLConfig = KLConfig(coef=0.001, placement="loss"),
        critic: CriticConfig | None = None,
        **kwargs,
    ) -> None:
        """
        Args:
            advantage: ``estimator: grpo`` with its ``scale``, ``min_std`` and ``per_term`` options.
            kl: k3 KL loss term with coefficient 0.001 (the CE-PO authors' setting).
            critic: None: GRPO needs no value model.
            **kwargs: Every other option of :class:`CEPOModule` (policy, generation, rewards, loss, ...).
        """
        super().__init__(advantage=advantage, kl=kl, critic=critic, **kwargs)


class RLOO(CEPOModule):
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): each sample's baseline is the mean
    reward of the other G - 1 samples of its prompt, no std scaling, clipped surrogate, k3 KL loss term.
    The loop of :class:`CEPOModule` with these defaults."""

    algorithm = "rloo"

    def __init__(
        self,
        advantage: AdvantageConfig = AdvantageConfig(estimator="rloo"),
        kl: KLConfig = KLConfig(coef=0.001, placement="loss"),
        critic: CriticConfig | None = None,
        **kwargs,
    ) -> None:
        """
        Args:
            advantage: ``estimator: rloo`` (needs ``group_size`` >= 2).
            kl: k3 KL loss term with coefficient 0.001.
            critic: None: RLOO needs no value model.
            **kwargs: Every other option of :class:`CEPOModule`.
        """
        super().__init__(advantage=advantage, kl=kl, critic=critic, **kwargs)


class ReinforcePP(CEPOModule):
    """REINFORCE++ (Hu 2025): the KL penalty in the per-token rewards, per-token returns normalised over the
    whole batch (the batch mean is the baseline; no critic, no group needed), clipped surrogate. The loop of
    :class:`CEPOModule` with these defaults."""

    algorithm = "reinforce_pp"

    def __init__(
        self,
        advantage: AdvantageConfig = AdvantageConfig(estimator="reinforce_pp"),
        kl: KLConfig = KLConfig(coef=0.001, placement="reward"),
        critic: CriticConfig | None = None,
        **kwargs,
    ) -> None:
        """
        Args:
            advantage: ``estimator: reinforce_pp`` with discount ``gamma``.
            kl: k1 penalty in the token rewards with coefficient 0.001.
            critic: None: REINFORCE++ needs no value model.
            **kwargs: Every other option of :class:`CEPOModule`.
        """
        super().__init__(advantage=advantage, kl=kl, critic=critic, **kwargs)


class PPO(CEPOModule):
    """Proximal Policy Optimization (Schulman et al. 2017) for a LoRA policy: a critic, GAE advantages
    (Schulman et al. 2016), whitened, value clipping, and the KL to the reference as a per-token penalty in
    the rewards (Ziegler et al. 2019), fixed or adaptive. The loop of :class:`CEPOModule` with these
    defaults."""

    algorithm = "ppo"

    def __init__(
        self,
        advantage: AdvantageConfig = AdvantageConfig(estimator="gae", whiten=True),
        kl: KLConfig = KLConfig(coef=0.001, placement="reward"),
        critic: CriticConfig | None = CriticConfig(),
        group_size: int = 1,
        num_iterations: int = 2,
        **kwargs,
    ) -> None:
        """
        Args:
            advantage: ``estimator: gae`` (``gamma``, ``lam``; CE-PO authors: 1.0, 1.0), whitened.
            kl: k1 penalty in the token rewards, coefficient 0.001 (the authors' PPO run); set ``target``
                for the adaptive controller.
            critic: The value model: a value head on the policy (``kind: head``) or a separate adapter.
            group_size: Samples per prompt (PPO needs no group; 1 is the usual choice).
            num_iterations: PPO epochs over each rollout (each epoch runs every mini-batch once).
            **kwargs: Every other option of :class:`CEPOModule`.
        """
        super().__init__(advantage=advantage, kl=kl, critic=critic, group_size=group_size,
                         num_iterations=num_iterations, **kwargs)
