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

Beside the loop, each in its own module and mixed into :class:`CEPOModule`: the options and their checks
(:mod:`cepo.training.options`), the optimiser, its schedule and accumulation
(:mod:`cepo.training.optimisation`), the run's logging (:mod:`cepo.training.run_logging`) and the
checkpoint state (:mod:`cepo.training.module_state`).
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from cepo.answers import AnswerParser, resolve_markers
from cepo.data.datamodule import PromptBatch
from cepo.data.prompts import render_prompt
from cepo.evaluation.metrics import EvalMetrics
from cepo.policy.generation import (
    GenerationConfig,
    check_position_budget,
    generate_completions,
    visible_prompts,
    warn_prompts_cut,
)
from cepo.policy.loading import (
    REFERENCE_ADAPTER,
    PolicyConfig,
    expected_prompt_ending,
    load_policy,
    load_tokenizer,
)
from cepo.policy.logprobs import batched_logprobs, completion_logprobs, micro_batches
from cepo.records import Rollout
from cepo.rewards.base import (
    AccuracyReward,
    NetworkReward,
    RewardFunction,
    check_reward_values,
    refuse_doubled_rewards,
)
from cepo.rewards.combiner import fuse_terms, normalized_weights
from cepo.rl.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs, kl_penalized_rewards
from cepo.rl.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, k1_kl
from cepo.rl.losses import clipped_value_loss, explained_variance, loss_normalizer, policy_objective
from cepo.rl.reductions import masked_mean, masked_sum, whiten
from cepo.training.checkpointing import atomic_folder
from cepo.training.critic import CRITIC_ADAPTER, Critic, CriticConfig
from cepo.training.module_state import CheckpointState, fold_optimizer_steps
from cepo.training.monitors import ConstantRewardMonitor
from cepo.training.optimisation import Optimisation
from cepo.training.options import (
    AdvantageConfig,
    KLConfig,
    OptimConfig,
    OptionChecks,
    PolicyLossConfig,
    PromptConfig,
    PromptTemplate,
)
from cepo.training.predict import PredictionBatch
from cepo.training.run_logging import RunLogging

__all__ = [
    "PPO", "RLOO", "AdvantageConfig", "CEPOModule", "GRPO", "KLConfig", "OptimConfig", "PolicyLossConfig",
    "PreparedRollout", "PromptConfig", "PromptTemplate", "ReinforcePP", "fold_optimizer_steps",
]


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


class CEPOModule(OptionChecks, Optimisation, RunLogging, CheckpointState, LightningModule):
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
        reward_stall_steps: int = 10,
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
            reward_p: Exponent p of the weighted power mean that fuses the terms (docs/design.md#combiner): 1 =
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
            completions_to_log: Completions logged per logged step as a table with every reward term and the
                advantage (TensorBoard text, W&B table, MLflow artifact, CSV logger's ``completions.jsonl``; 0 = none).
            eval_num_samples: Completions per prompt in validation/test. 1 with ``eval_temperature`` 0 is
                greedy pass@1; n > 1 (needs ``generation.eval_temperature`` > 0) reports ``accuracy`` as
                the mean over n samples and ``pass_at_n`` as the fraction of prompts with any right one.
            reward_stall_steps: Warn when every completion of the batch got the same fused reward, the same
                value, for this many rollout steps in a row (nothing is learned from the reward then);
                ``train/reward_constant_steps`` counts the current run of such steps. 0 never warns.
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
        self._prompt_ending_warned: set[str] = set()  # datasets already warned about (render_prompts)
        self.eval_num_samples = eval_num_samples
        self.reward_stall_steps = reward_stall_steps
        self.constant_reward = ConstantRewardMonitor(reward_stall_steps)
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

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self.tokenizer = load_tokenizer(self.policy_config)
        self.policy, self.has_reference_adapter = load_policy(self.policy_config)
        self.policy.train()  # from_pretrained returns eval mode; generation switches modes itself
        fitting = self._trainer is None or self.trainer.state.fn == "fit"
        check_position_budget(self.policy, self.generation, training=fitting)
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
        refuse_doubled_rewards(self.network_rewards())

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

    # ------------------------------------------------------------------ rollouts
    def render_prompts(self, examples) -> list[str]:
        prompts = [
            render_prompt(
                ex, family=None if self.prompt.template == "auto" else self.prompt.template,
                tokenizer=self.tokenizer, use_chat_template=self.prompt.use_chat_template,
                marker=self.prompt.marker, system_prompt=self.prompt.system_prompt,
            )
            for ex in examples
        ]
        self._check_prompt_endings(examples, prompts)
        return prompts

    def _check_prompt_endings(self, examples, prompts: list[str]) -> None:
        """Warn once per dataset when an embedded model gets prompts that do not end as the ones it was
        trained on: it then continues the line instead of answering, and scores near 0 without an error.
        The prompts are not edited: a raw template promises the question as written."""
        ending = expected_prompt_ending(self.policy_config.name_or_path)
        if not ending:
            return
        for source in {ex.source for ex in examples} - self._prompt_ending_warned:
            bad = [p for ex, p in zip(examples, prompts) if ex.source == source and not p.endswith(ending)]
            if bad:
                self._prompt_ending_warned.add(source)
                rank_zero_warn(
                    f"{len(bad)} of {sum(ex.source == source for ex in examples)} prompts from {source!r} do not end "
                    f"with {ending!r}, as the prompts {self.policy_config.name_or_path} was trained on do "
                    f"(e.g. {bad[0][-40:]!r}); it will continue the line instead of answering. End each "
                    f"question with {ending!r} (in JSONL: \"question\": \"Q: 7+5-3 hint: 9\\n\") and keep "
                    "model.prompt.template raw."
                )

    def make_rollout(self, batch: PromptBatch, stage: str) -> Rollout:
        """Generate completions for the batch's prompts and parse them into X and Y."""
        train = stage == "train"
        group = self.group_size if train else self.eval_num_samples
        prompts = self.render_prompts(batch.examples)
        gen = self.generation
        # generation.sampling_seed: each prompt's samples keyed by its text, not by this device's stream.
        keys = (None if gen.sampling_seed is None
                else [json.dumps([gen.sampling_seed, stage, self.rollout_step, p]) for p in prompts])
        generated = generate_completions(
            self.policy, self.tokenizer, prompts, group,
            max_new_tokens=gen.max_new_tokens if train else (gen.eval_max_new_tokens or gen.max_new_tokens),
            temperature=gen.temperature if train else gen.eval_temperature,
            top_p=gen.top_p if train else 1.0, top_k=gen.top_k if train else 0,
            max_prompt_tokens=gen.max_prompt_tokens, sample_keys=keys,
        )
        completions = self.tokenizer.batch_decode(generated.completion_ids, skip_special_tokens=True)
        parsed = [self.parser(text) for text in completions]
        warn_prompts_cut(generated.prompt_truncated, stage, gen.max_prompt_tokens)
        rows = [ex for ex in batch.examples for _ in range(group)]
        return Rollout(
            examples=rows,
            prompts=visible_prompts(self.tokenizer, [p for p in prompts for _ in range(group)], generated),
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
            prompt_truncated=generated.prompt_truncated,
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
        fused = fuse_terms(rollout.rewards, rollout.reward_weights, self.reward_p)
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
        # Only the options this estimator reads (the others were checked to be at their defaults).
        advantages, returns = self.estimator.compute(inputs, **{name: getattr(adv, name) for name in self.estimator.options})
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
        over micro-batches (:meth:`micro_losses`). Returns the mean of each statistic over the optimiser steps."""
        totals: dict[str, list[float]] = {}
        for _ in range(self.num_iterations):
            for rows in self.minibatch_rows(len(rollout)):
                normalizer = self.global_sum(loss_normalizer(prepared.mask[rows], self.loss.aggregation,
                                                             self.generation.max_new_tokens))
                step_stats: list[dict[str, torch.Tensor]] = []
                grad_norm = self.optimizer_step_with_accumulation(
                    self.micro_losses(rollout, prepared, rows, normalizer, step_stats))
                totals.setdefault("grad_norm", []).append(grad_norm)
                for key in step_stats[0]:
                    values = torch.stack([s[key].float() for s in step_stats])
                    # the losses are normalised by the whole mini-batch: micro-batch parts add up
                    summed = key in ("loss", "policy_loss", "value_loss")
                    totals.setdefault(key, []).append(float(values.sum() if summed else values.mean()))
        return {key: sum(v) / len(v) for key, v in totals.items()}

    def micro_losses(self, rollout: Rollout, prepared: PreparedRollout, rows: slice, normalizer: torch.Tensor,
                     step_stats: list[dict[str, torch.Tensor]]):
        """The losses of the mini-batch ``rows``, one micro-batch at a time (a generator, so each graph is
        freed after its backward); each micro-batch's statistics are appended to ``step_stats``. With a
        separate critic adapter the value loss is a second loss per micro-batch, yielded (and so
        backpropagated) while the critic adapter is active."""
        mask, old_logp, ref_logp = prepared.mask, prepared.old_logp, prepared.ref_logp
        temperature = self._logprob_temperature()
        kl_in_loss = self.kl.placement == "loss"
        kl_coef = self.kl_controller.value if kl_in_loss else 0.0
        # With the KL in the reward, the loss still reports k3 as a monitor.
        kl_estimator = self.kl.resolved_estimator() if kl_in_loss else "k3"
        world = self._world_size()
        critic = self.critic
        for micro in micro_batches(rows.stop - rows.start, self.micro_batch_size):
            sub = slice(rows.start + micro.start, rows.start + micro.stop)
            part = self.rollout_tensors(rollout, sub)
            logp, entropy, hidden = completion_logprobs(
                self.policy, *part, temperature=temperature, with_entropy=True,
                return_hidden=critic is not None and not critic.separate,
            )
            old = old_logp[sub] if old_logp is not None else logp.detach()
            policy_loss, s = policy_objective(
                logp, old, prepared.advantages[sub], mask[sub], policy_loss=self.loss.name,
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
            if not critic.separate:
                loss = policy_loss + self.value_loss(critic.value_head(hidden), prepared, sub, normalizer, s, policy_loss)
                step_stats.append(s)
                yield loss
            else:
                yield policy_loss
                with self.critic_adapter():
                    value_loss = self.value_loss(critic.values(self.policy, *part), prepared, sub, normalizer, s,
                                                 policy_loss)
                    step_stats.append(s)
                    yield value_loss  # backward runs here, with the critic adapter active

    def value_loss(self, values: torch.Tensor, prepared: PreparedRollout, sub: slice, normalizer: torch.Tensor,
                   stats: dict[str, torch.Tensor], policy_loss: torch.Tensor) -> torch.Tensor:
        """The critic's weighted, clipped value loss on the rows ``sub``; records its statistics in ``stats``."""
        critic, world = self.critic, self._world_size()
        loss, clip_fraction = clipped_value_loss(
            values, prepared.values[sub], prepared.returns[sub], prepared.mask[sub], critic.config.value_clip,
            normalizer=normalizer,
        )
        stats["value_clip_fraction"] = clip_fraction
        stats["value_loss"] = loss.detach() * world
        stats["loss"] = (policy_loss.detach() + critic.config.value_coef * loss.detach()) * world
        return critic.config.value_coef * loss

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

    # ------------------------------------------------------------------ evaluation
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

    def on_fit_end(self) -> None:
        self.export_adapter(str(self.run_dir() / "adapter"))

    @rank_zero_only
    def export_adapter(self, path: str) -> None:
        """Write the trained LoRA adapter in PEFT format (``PeftModel.from_pretrained`` loads it) and the
        tokenizer to ``path`` (``fit`` writes ``<log_dir>/adapter``); with a critic also
        ``value_head.safetensors`` and, for ``critic.kind: separate``, the critic adapter in ``critic/``.
        The folder is written as one step (:func:`~cepo.training.checkpointing.atomic_folder`): a kill
        leaves the previous folder or the new one, never a mix."""
        from cepo.training.export import model_card, write_adapter_files  # export imports this module's peers

        target = Path(path)
        trainer = self._trainer
        run_dir = target.parent.parent if target.parent.name == "checkpoints" else target.parent
        card = model_card(self, getattr(trainer, "datamodule", None), trainer.callbacks if trainer else [],
                          run_dir, self.rollout_step, adapter=True)
        with atomic_folder(target) as staging:
            self.policy.save_pretrained(str(staging), selected_adapters=["default"])
            self.tokenizer.save_pretrained(str(staging))
            if self.critic is not None:
                self.critic.export(self.policy, staging)
            write_adapter_files(staging, self.policy_config.name_or_path, card)
        if self.critic is not None:
            rank_zero_info(f"value head written to {target}")
        rank_zero_info(f"LoRA adapter written to {target}")


class GRPO(CEPOModule):
    """Group Relative Policy Optimization (Shao et al. 2024): G samples per prompt, advantages z-scored
    within each group, clipped surrogate (optionally asymmetric, DAPO), k3 KL to the reference as a loss
    term, no critic. The loop of :class:`CEPOModule` with these defaults."""

    algorithm = "grpo"

    def __init__(
        self,
        advantage: AdvantageConfig = AdvantageConfig(estimator="grpo"),
        kl: KLConfig = KLConfig(placement="loss"),
        critic: CriticConfig | None = None,
        **kwargs,
    ) -> None:
        """
        Args:
            advantage: ``estimator: grpo`` with its ``scale``, ``min_std`` and ``per_term`` options.
            kl: k3 KL loss term at the default ``KLConfig.coef`` (the CE-PO authors' setting).
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
        kl: KLConfig = KLConfig(placement="loss"),
        critic: CriticConfig | None = None,
        **kwargs,
    ) -> None:
        """
        Args:
            advantage: ``estimator: rloo`` (needs ``group_size`` >= 2).
            kl: k3 KL loss term at the default ``KLConfig.coef``.
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
        kl: KLConfig = KLConfig(placement="reward"),
        critic: CriticConfig | None = None,
        **kwargs,
    ) -> None:
        """
        Args:
            advantage: ``estimator: reinforce_pp`` with discount ``gamma``.
            kl: k1 penalty in the token rewards at the default ``KLConfig.coef``.
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
        kl: KLConfig = KLConfig(placement="reward"),
        critic: CriticConfig | None = CriticConfig(),
        group_size: int = 1,
        num_iterations: int = 2,
        **kwargs,
    ) -> None:
        """
        Args:
            advantage: ``estimator: gae`` (``gamma``, ``lam``; CE-PO authors: 1.0, 1.0), whitened.
            kl: k1 penalty in the token rewards at the default ``KLConfig.coef`` (the authors' PPO run); set
                ``target`` for the adaptive controller.
            critic: The value model: a value head on the policy (``kind: head``) or a separate adapter.
            group_size: Samples per prompt (PPO needs no group; 1 is the usual choice).
            num_iterations: PPO epochs over each rollout (each epoch runs every mini-batch once).
            **kwargs: Every other option of :class:`CEPOModule`.
        """
        super().__init__(advantage=advantage, kl=kl, critic=critic, group_size=group_size,
                         num_iterations=num_iterations, **kwargs)
