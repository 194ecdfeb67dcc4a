"""PPO with a value head, behind the same rollout and reward pipeline as GRPO.

Per rollout: old log-probs and values (no gradient), reference log-probs, per-token rewards (the fused
score on the last completion token, minus the KL penalty on every token), GAE advantages and returns,
whitening, then ``num_iterations`` epochs over mini-batches of the clipped policy surrogate plus the
clipped value loss. The math lives in :mod:`cepo.rl.ppo` and :mod:`cepo.rl.grpo`; this module wires it.

Two critics are available. ``head``: a linear value head on the policy's final hidden states, trained
with the LoRA weights (shared features, one forward pass). ``separate``: a second LoRA adapter
(``critic``) on the same frozen base plus its own value head, run in its own forward pass so the policy
loss never shapes the critic's features; no second copy of the base weights.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cepo.policy.forward import hidden_states, unwrap
from cepo.policy.logprobs import batched_logprobs, completion_logprobs, micro_batches
from cepo.rl.grpo import grpo_loss, loss_normalizer, masked_mean, masked_sum
from cepo.rl.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_value_loss,
    explained_variance,
    gae,
    kl_penalized_rewards,
    whiten,
)
from cepo.training.module import CEPOModule
from cepo.rollout import Rollout

VALUE_MODELS = ("head", "separate")
KL_MODES = ("reward", "loss")
CRITIC_ADAPTER = "critic"
VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """``V(s_t)``: a dropout-free linear map from a final hidden state to a scalar, zero-initialised so
    that every value starts at 0 and the first advantages are the returns themselves."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.score = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """(..., hidden) -> (...) float32 values."""
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1).float()

    @classmethod
    def from_file(cls, path: str | Path) -> ValueHead:
        """Load a head written by :meth:`PPO.export_adapter` (``value_head.safetensors``)."""
        tensors = load_file(str(path))
        head = cls(tensors["score.weight"].shape[-1])
        head.load_state_dict(tensors)
        return head


def scoring_positions(hidden: Tensor, prompt_length: int) -> Tensor:
    """The hidden states that score the completion tokens: position ``t - 1`` scores token ``t``, so the
    value of completion token ``t`` is read from the state *before* it is emitted. (batch, T, hidden);
    the same slice :func:`cepo.policy.forward.completion_logits` takes for the logits."""
    return hidden[:, prompt_length - 1 : -1]


class PPO(CEPOModule):
    """Proximal Policy Optimization (Schulman et al. 2017) for a LoRA policy, with GAE (Schulman et al.
    2016), value clipping, whitened advantages and a KL penalty to the reference either in the per-token
    reward (Ziegler et al. 2019) or as a k3 loss term. The sequence reward is the fused CE-PO score.
    """

    algorithm = "ppo"

    def __init__(
        self,
        value_model: str = "head",
        gamma: float = 1.0,
        lam: float = 1.0,
        epsilon: float = 0.2,
        value_clip: float = 0.2,
        value_coef: float = 0.5,
        kl_mode: str = "reward",
        kl_coef: float = 0.001,
        kl_target: float | None = None,
        kl_horizon: int = 10000,
        whiten_advantages: bool = True,
        critic_lr: float | None = None,
        group_size: int = 1,
        num_iterations: int = 2,
        **kwargs,
    ) -> None:
        """
        Args:
            value_model: The critic. ``head``: a linear value head on the policy's final hidden states,
                trained together with the LoRA weights (the value loss also shapes the policy's features).
                ``separate``: a second LoRA adapter named ``critic`` on the same frozen base plus its own
                value head, in its own forward pass (no policy gradient reaches the critic; one extra
                forward/backward per micro-batch; no second copy of the base weights; not yet tried under
                data parallelism, where two backward passes per micro-batch need unused-parameter detection).
            gamma: Discount factor of the per-token returns (CE-PO authors' PPO run: 1.0).
            lam: GAE lambda: 1 = Monte-Carlo returns minus values, 0 = one-step TD (authors: 1.0).
            epsilon: Clip range of the policy ratio.
            value_clip: Clip range of the value update around the rollout's values (PPO value clipping).
            value_coef: Weight of the value loss added to the policy loss.
            kl_mode: Where the KL to the reference enters: ``reward`` (per-token penalty
                ``-kl_coef * (log pi - log pi_ref)`` in the rewards, Ziegler et al. 2019; the authors'
                setting) or ``loss`` (k3 KL loss term with coefficient ``kl_coef``, as in GRPO).
            kl_coef: KL coefficient (initial value when ``kl_target`` is set). 0 with no ``kl_target``
                skips the reference forward pass.
            kl_target: Target KL per sequence (summed over tokens, k1 estimator, measured on each rollout)
                of the adaptive controller of Ziegler et al. 2019; None keeps ``kl_coef`` fixed.
            kl_horizon: Horizon of the adaptive controller in samples: the coefficient moves by at most
                20 % per ``kl_horizon`` completions.
            whiten_advantages: Normalise advantages to mean 0, variance 1 over the rollout's completion
                tokens (over all devices under data parallelism).
            critic_lr: Learning rate of the value parameters (value head, and the critic adapter for
                ``separate``) in their own optimiser group with the same schedule; None = ``optim.lr``.
                With ``head``, the value loss still reaches the policy's LoRA weights at ``optim.lr``.
            group_size: Samples per prompt (PPO needs no group; 1 is the usual choice).
            num_iterations: PPO epochs over each rollout (each epoch runs every mini-batch once).
            **kwargs: Shared options of :class:`CEPOModule` (policy, generation, rewards, mini_batch_size, ...).
        """
        super().__init__(group_size=group_size, num_iterations=num_iterations, **kwargs)
        self._check_ppo_options(value_model, gamma, lam, epsilon, value_clip, value_coef, kl_mode, kl_coef,
                                kl_target, kl_horizon, critic_lr)
        self.value_model = value_model
        self.gamma, self.lam = float(gamma), float(lam)
        self.epsilon, self.value_clip, self.value_coef = float(epsilon), float(value_clip), float(value_coef)
        self.kl_mode, self.kl_target, self.kl_horizon = kl_mode, kl_target, kl_horizon
        self.whiten_advantages = whiten_advantages
        self.critic_lr = critic_lr
        if kl_target is None:
            self.kl_controller = FixedKLController(kl_coef)
        else:
            self.kl_controller = AdaptiveKLController(kl_coef, kl_target, kl_horizon)
        self.value_head: ValueHead | None = None

    @staticmethod
    def _check_ppo_options(value_model, gamma, lam, epsilon, value_clip, value_coef, kl_mode, kl_coef,
                           kl_target, kl_horizon, critic_lr) -> None:
        if value_model not in VALUE_MODELS:
            raise ValueError(f"model.value_model={value_model!r}; choose 'head' (value head on the policy) or "
                             "'separate' (critic LoRA adapter with its own head)")
        if kl_mode not in KL_MODES:
            raise ValueError(f"model.kl_mode={kl_mode!r}; choose 'reward' (per-token penalty) or 'loss' (k3 term)")
        for name, value in (("gamma", gamma), ("lam", lam)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"model.{name}={value} must lie in [0, 1] (1.0 is the CE-PO authors' setting)")
        if not epsilon > 0:
            raise ValueError(f"model.epsilon={epsilon} must be > 0 (0.2 is usual)")
        if not value_clip > 0:
            raise ValueError(f"model.value_clip={value_clip} must be > 0 (0.2 is usual; use a large value to "
                             "effectively disable value clipping)")
        if not value_coef > 0:
            raise ValueError(f"model.value_coef={value_coef} must be > 0, or the critic never learns (0.5 is usual)")
        if not kl_coef >= 0:
            raise ValueError(f"model.kl_coef={kl_coef} must be >= 0 (0 disables the KL to the reference)")
        if kl_target is not None:
            if not kl_target > 0:
                raise ValueError(f"model.kl_target={kl_target} must be > 0, or None for a fixed kl_coef")
            if not kl_coef > 0:
                raise ValueError("model.kl_target needs model.kl_coef > 0: the adaptive controller scales the "
                                 "coefficient multiplicatively, so it would stay 0 forever")
        if kl_horizon < 1:
            raise ValueError(f"model.kl_horizon={kl_horizon} must be >= 1 (samples; 10000 is usual)")
        if critic_lr is not None and not critic_lr > 0:
            raise ValueError(f"model.critic_lr={critic_lr} must be > 0, or None to use model.optim.lr")

    # ------------------------------------------------------------------ networks
    def configure_extra_modules(self) -> None:
        config = unwrap(self.policy).config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.value_head = ValueHead(text_config.hidden_size)
        if self.value_model == "separate":
            lora = self.policy_config.lora
            self.policy.add_adapter(CRITIC_ADAPTER, LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            ))
            self.policy.set_adapter("default")
            self.freeze_inactive_adapters()

    def freeze_inactive_adapters(self) -> None:
        # Keep the critic adapter trainable too: set_adapter() would freeze every inactive adapter.
        for name, param in self.policy.named_parameters():
            if "lora_" in name:
                param.requires_grad_(".default." in name or f".{CRITIC_ADAPTER}." in name)

    @contextmanager
    def critic_adapter(self):
        """Run the ``critic`` adapter instead of the policy's. Gradients of a loss computed inside must be
        taken inside too: with gradient checkpointing the backward pass recomputes the forward with
        whichever adapter is active then."""
        self.policy.set_adapter(CRITIC_ADAPTER)
        self.freeze_inactive_adapters()
        try:
            yield self.policy
        finally:
            self.policy.set_adapter("default")
            self.freeze_inactive_adapters()

    def value_parameters(self) -> list[nn.Parameter]:
        """The critic's own parameters: the value head, plus the critic adapter for ``separate``."""
        params = list(self.value_head.parameters())
        if self.value_model == "separate":
            params += [p for n, p in self.policy.named_parameters() if f".{CRITIC_ADAPTER}." in n]
        return params

    def critic_values(self, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                      completion_mask: Tensor) -> Tensor:
        """Values (B, T) of the completion tokens from the network that is active now (call inside
        :meth:`critic_adapter` for ``separate``). Runs the backbone only: no vocabulary-sized logits."""
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        hidden = hidden_states(self.policy, attention_mask, input_ids=input_ids)
        return self.value_head(scoring_positions(hidden, prompt_ids.shape[1]))

    @torch.no_grad()
    def rollout_logprobs_and_values(self, tensors: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """Old log-probs and old values (B, T) of the rollout, micro-batched, without gradients."""
        temperature = self.generation.temperature
        if self.value_model == "separate":
            logp, _ = batched_logprobs(self.policy, tensors, self.micro_batch_size, temperature)
            with self.critic_adapter():
                values = torch.cat([
                    self.critic_values(*(t[rows] for t in tensors))
                    for rows in micro_batches(tensors[0].shape[0], self.micro_batch_size)
                ])
            return logp, values
        logps, values = [], []
        for rows in micro_batches(tensors[0].shape[0], self.micro_batch_size):
            logp, _, hidden = completion_logprobs(self.policy, *(t[rows] for t in tensors),
                                                  temperature=temperature, return_hidden=True)
            logps.append(logp)
            values.append(self.value_head(hidden))
        return torch.cat(logps), torch.cat(values)

    # ------------------------------------------------------------------ advantages
    def token_rewards(self, scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
        """Per-token rewards (B, T): the fused score on the last completion token, minus ``kl_coef`` times
        the per-token k1 KL on every token when ``kl_mode='reward'`` (scores only for ``'loss'``)."""
        return kl_penalized_rewards(scores, kl, mask, kl_coef if self.kl_mode == "reward" else 0.0)

    def advantages_and_returns(self, token_rewards: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """GAE advantages and returns (B, T), before whitening."""
        return gae(token_rewards, values, mask, self.gamma, self.lam)

    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def whiten_over_devices(self, advantages: Tensor, mask: Tensor) -> Tensor:
        """:func:`cepo.rl.ppo.whiten` with the mean and variance of the valid tokens of *all* devices, so
        a data-parallel run whitens as a single-device run on the whole rollout would."""
        if self._world_size() == 1:
            return whiten(advantages, mask)
        count = self.global_sum(masked_sum(torch.ones_like(advantages), mask)).clamp_min(1.0)
        mean = self.global_sum(masked_sum(advantages, mask)) / count
        variance = self.global_sum(masked_sum((advantages - mean) ** 2, mask)) / count
        whitened = (advantages - mean) * torch.rsqrt(variance + 1e-8)
        return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))

    def _global_mean(self, value: Tensor) -> float:
        if self._world_size() > 1:
            value = self.trainer.strategy.reduce(value.float(), reduce_op="mean")
        return float(value)

    # ------------------------------------------------------------------ update
    def update(self, rollout: Rollout, rewards: Tensor) -> dict[str, float]:
        tensors = self.rollout_tensors(rollout)
        mask = rollout.completion_mask.float()
        temperature = self.generation.temperature
        kl_coef = self.kl_controller.value
        stats: dict[str, float] = {"kl_coef": kl_coef}

        start = time.perf_counter()
        old_logp, old_values = self.rollout_logprobs_and_values(tensors)
        stats["time/values_s"] = time.perf_counter() - start
        start = time.perf_counter()
        ref_logp = None
        if self.kl_target is not None or kl_coef > 0:
            with self.reference_model() as reference:
                ref_logp, _ = batched_logprobs(reference, tensors, self.micro_batch_size, temperature)
        stats["time/reference_s"] = time.perf_counter() - start

        kl = (old_logp - ref_logp) if ref_logp is not None else torch.zeros_like(old_logp)  # k1, (B, T)
        sequence_kl = self._global_mean(masked_sum(kl, mask, dim=-1).mean())
        token_rewards = self.token_rewards(rewards, kl, mask, kl_coef)
        advantages, returns = self.advantages_and_returns(token_rewards, old_values, mask)
        stats.update(self._target_stats(advantages, returns, old_values, mask))
        stats["kl_sequence"] = sequence_kl
        if self.whiten_advantages:
            advantages = self.whiten_over_devices(advantages, mask)

        beta = kl_coef if self.kl_mode == "loss" else 0.0
        world = self._world_size()
        totals: dict[str, list[float]] = {}
        for _ in range(self.num_iterations):
            for rows in self.minibatch_rows(len(rollout)):
                normalizer = self.global_sum(loss_normalizer(mask[rows], "dapo"))
                step_stats: list[dict[str, Tensor]] = []

                def micro_losses(rows=rows, normalizer=normalizer, step_stats=step_stats):
                    for micro in micro_batches(rows.stop - rows.start, self.micro_batch_size):
                        sub = slice(rows.start + micro.start, rows.start + micro.stop)
                        part = self.rollout_tensors(rollout, sub)
                        logp, entropy, hidden = completion_logprobs(
                            self.policy, *part, temperature=temperature, with_entropy=True,
                            return_hidden=self.value_model == "head",
                        )
                        policy_loss, s = grpo_loss(
                            logp, old_logp[sub], advantages[sub], mask[sub], eps_low=self.epsilon, beta=beta,
                            ref_logp=ref_logp[sub] if ref_logp is not None else None, loss_type="dapo",
                            normalizer=normalizer,
                        )
                        s["entropy"] = masked_mean(entropy, mask[sub])
                        s["approx_kl"] = masked_mean(0.5 * (logp.detach() - old_logp[sub]) ** 2, mask[sub])

                        def value_loss_of(values):
                            loss, clip_fraction = clipped_value_loss(
                                values, old_values[sub], returns[sub], mask[sub], self.value_clip,
                                normalizer=normalizer,
                            )
                            s["value_clip_fraction"] = clip_fraction
                            # report global values: DDP averages the parts scaled by the global normaliser
                            s["value_loss"] = loss.detach() * world
                            s["policy_loss"] = s["policy_loss"] * world
                            s["loss"] = (policy_loss.detach() + self.value_coef * loss.detach()) * world
                            return self.value_coef * loss

                        if self.value_model == "head":
                            loss = policy_loss + value_loss_of(self.value_head(hidden))
                            step_stats.append(s)
                            yield loss
                        else:
                            yield policy_loss
                            with self.critic_adapter():
                                value_loss = value_loss_of(self.critic_values(*part))
                                step_stats.append(s)
                                yield value_loss  # backward runs here, with the critic adapter active

                grad_norm = self.optimizer_step_with_accumulation(micro_losses())
                totals.setdefault("grad_norm", []).append(grad_norm)
                for key in step_stats[0]:
                    values = torch.stack([s[key].float() for s in step_stats])
                    # the losses are normalised by the whole mini-batch: micro-batch parts add up
                    summed = key in ("loss", "policy_loss", "value_loss")
                    totals.setdefault(key, []).append(float(values.sum() if summed else values.mean()))
        stats.update({key: sum(v) / len(v) for key, v in totals.items()})
        self.kl_controller.update(sequence_kl, len(rollout) * world)
        return stats

    @staticmethod
    @torch.no_grad()
    def _target_stats(advantages: Tensor, returns: Tensor, values: Tensor, mask: Tensor) -> dict[str, float]:
        def mean_std(x: Tensor) -> tuple[float, float]:
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

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        config = super().configure_optimizers()
        if self.critic_lr is None:
            return config
        # Same optimiser and schedule as the base, with the value parameters in a group of their own.
        factor = config["lr_scheduler"]["scheduler"].lr_lambdas[0]
        critic_ids = {id(p) for p in self.value_parameters()}
        params = self.trainable_parameters()
        groups = [
            {"params": [p for p in params if id(p) not in critic_ids], "lr": self.optim.lr},
            {"params": [p for p in params if id(p) in critic_ids], "lr": self.critic_lr},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=tuple(self.optim.betas), eps=self.optim.eps,
                                      weight_decay=self.optim.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints and export
    def extra_checkpoint_state(self) -> dict[str, Any]:
        kind = "fixed" if isinstance(self.kl_controller, FixedKLController) else "adaptive"
        return {"kl_controller": {"kind": kind, **self.kl_controller.state_dict()}}

    def load_extra_checkpoint_state(self, state: dict[str, Any]) -> None:
        saved = state.get("kl_controller")
        if saved is None:
            return
        kind = "fixed" if isinstance(self.kl_controller, FixedKLController) else "adaptive"
        if saved["kind"] != kind:
            rank_zero_warn(f"the checkpoint's KL controller is {saved['kind']}, this run's is {kind} "
                           f"(model.kl_target): keeping this run's kl_coef={self.kl_controller.value}")
            return
        if kind == "adaptive":  # a fixed coefficient comes from this run's configuration, as kl_target does
            self.kl_controller.load_state_dict(saved)

    @rank_zero_only
    def export_adapter(self, path: str) -> None:
        """The policy adapter and tokenizer (as the base class writes them), plus ``value_head.safetensors``
        (load with :meth:`ValueHead.from_file`) and, for ``separate``, the critic adapter in ``critic/``."""
        target = Path(path)
        super().export_adapter(str(target))
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.value_head.state_dict().items()}
        save_file(tensors, str(target / VALUE_HEAD_FILE), metadata={"value_model": self.value_model})
        if self.value_model == "separate":
            self.policy.save_pretrained(str(target), selected_adapters=[CRITIC_ADAPTER])
        rank_zero_info(f"value head written to {target / VALUE_HEAD_FILE}")
