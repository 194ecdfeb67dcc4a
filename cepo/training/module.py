"""The LightningModules: rollout -> score -> advantage -> update, with the math in ``cepo.rl``.

:class:`CEPOModule` holds what every algorithm shares (policy loading, generation, rewards and their
fusion, evaluation, checkpoint contents, logging); :class:`GRPO` adds the group-relative update. PPO
lives in :mod:`cepo.training.ppo`. Optimisation is manual: a rollout step runs several optimiser steps
(mini-batches x iterations), each accumulated over micro-batches, which Lightning's automatic loop
cannot express.
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
from typing import Any

import numpy as np
import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from cepo.answers import AnswerParser, resolve_markers
from cepo.data.datamodule import PromptBatch
from cepo.data.prompts import render_prompt
from cepo.evaluation.metrics import EvalMetrics, format_table
from cepo.policy.generation import GenerationConfig, generate_completions
from cepo.policy.loading import REFERENCE_ADAPTER, PolicyConfig, load_policy, load_tokenizer
from cepo.policy.logprobs import batched_logprobs, completion_logprobs, micro_batches
from cepo.rewards.base import AccuracyReward, RewardFunction
from cepo.rewards.combiner import power_mean
from cepo.rl.grpo import ADVANTAGE_SCALES, LOSS_TYPES, group_advantages, grpo_loss, loss_normalizer, masked_mean
from cepo.rl.grpo import zero_std_fraction
from cepo.rollout import Rollout
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
    scheduler: str = "constant"
    """``constant``, ``linear`` (decay to 0) or ``cosine`` (decay to 0), after warmup."""
    warmup_steps: int = 0
    """Optimiser steps of linear warmup from 0."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value (None disables clipping; the norm is still logged)."""


@dataclass
class PromptConfig:
    """How an example becomes the prompt Z that the policy sees, and how Y is found in a completion."""

    template: str = "auto"
    """Prompt family: ``auto`` (each dataset's own), ``raw`` (the question unchanged), ``math``,
    ``multiple_choice``, ``yes_no`` or ``open``."""
    use_chat_template: bool = False
    """Wrap the prompt with the tokenizer's chat template (instruct models)."""
    system_prompt: str | None = None
    """Optional system message (chat template only)."""
    marker: str = "answer"
    """Answer marker the prompt asks for: ``answer`` (<answer>...</answer>), ``finalanswer``, ``boxed``,
    ``gsm8k`` (#### n) or any tag name."""
    parse_markers: list[str] = field(default_factory=lambda: ["answer", "finalanswer", "boxed", "gsm8k"])
    """Markers the answer parser accepts, in priority order (the asked-for marker is tried first)."""


class CEPOModule(LightningModule):
    """Shared machinery of the RL algorithms. Subclasses implement :meth:`update`."""

    algorithm = "base"

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        generation: GenerationConfig = GenerationConfig(),
        optim: OptimConfig = OptimConfig(),
        prompt: PromptConfig = PromptConfig(),
        rewards: list[RewardFunction] | None = None,
        reward_p: float = 1.0,
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
                Callbacks such as ``CoherenceRewardCallback`` add more terms. Default: accuracy only.
            reward_p: Exponent p of the weighted power mean that fuses the terms (DESIGN §5): 1 =
                weighted mean, 0 = geometric mean, < 1 concave (coherence cannot buy back a wrong answer).
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
        self.reward_functions = list(rewards) if rewards is not None else [AccuracyReward()]
        self.reward_p = float(reward_p)
        self.group_size = group_size
        self.mini_batch_size = mini_batch_size
        self.micro_batch_size = micro_batch_size
        self.num_iterations = num_iterations
        self.completions_to_log = completions_to_log
        self.eval_num_samples = eval_num_samples
        self.parser = AnswerParser(resolve_markers(self.prompt.marker, self.prompt.parse_markers))
        self._check_static_options()
        # No save_hyperparameters(): LightningCLI writes the full config.yaml next to the logs, and
        # hyper-parameters inside checkpoints would override the command line on `--ckpt_path`.
        self.policy = None
        self.tokenizer = None
        self.has_reference_adapter = False
        self.rollout_step = 0  # rollouts trained on; the data position and seeds derive from it
        self._optimizer_steps = 0
        self._steps_this_rollout = 0
        self._eval_metrics: dict[str, EvalMetrics] = {}
        self._pending_rng: dict | None = None

    # ------------------------------------------------------------------ setup and validation of options
    def _check_static_options(self) -> None:
        names = [r.name for r in self.reward_functions]
        if len(set(names)) != len(names):
            raise ValueError(f"model.rewards has duplicate names {names}; set `name` on each reward")
        if self.group_size < 1 or self.micro_batch_size < 1 or self.num_iterations < 1:
            raise ValueError("model.group_size, model.micro_batch_size and model.num_iterations must be >= 1")
        if self.eval_num_samples < 1:
            raise ValueError("model.eval_num_samples must be >= 1")
        if self.eval_num_samples > 1 and self.generation.eval_temperature <= 0:
            raise ValueError(
                f"model.eval_num_samples={self.eval_num_samples} samples identical greedy completions; set "
                "model.generation.eval_temperature > 0 (e.g. 0.6) or eval_num_samples to 1"
            )
        if not math.isfinite(self.reward_p) and abs(self.reward_p) != math.inf:
            raise ValueError("model.reward_p must be a number (inf and -inf are allowed)")

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
        self.configure_extra_modules()

    def configure_extra_modules(self) -> None:
        """Hook for algorithm-specific trainable modules (PPO's value head)."""

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and datamodule is not None and hasattr(datamodule, "prompts_per_step"):
            self.check_batch_arithmetic(datamodule.prompts_per_step)
        weighted = {r.name: r.weight for r in self.reward_functions}
        if stage == "fit" and sum(weighted.values()) == 0 and not self._reward_callbacks():
            raise ValueError("every reward has weight 0 and no reward callback is configured: nothing to optimise")

    def _reward_callbacks(self) -> list:
        return [cb for cb in self.trainer.callbacks if hasattr(cb, "on_rollout_batch")] if self._trainer else []

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
        # set_adapter() toggles requires_grad per adapter; keep only the trained adapter trainable.
        for name, param in self.policy.named_parameters():
            if "lora_" in name:
                param.requires_grad_(".default." in name)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise ValueError("no trainable parameters: check policy.lora.target_modules matches the model's layers")
        optimizer = torch.optim.AdamW(
            params, lr=self.optim.lr, betas=tuple(self.optim.betas), eps=self.optim.eps,
            weight_decay=self.optim.weight_decay,
        )
        total = self._total_optimizer_steps()
        warmup, kind = self.optim.warmup_steps, self.optim.scheduler
        if kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"model.optim.scheduler={kind!r}; choose constant, linear or cosine")

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
        """Every reward term: the configured functions, then reward callbacks (the coherence reward),
        which decide themselves whether to score evaluation rollouts."""
        start = time.perf_counter()
        for fn in self.reward_functions:
            rollout.add_reward(fn.name, fn(rollout), fn.weight)
        rollout.stats["time/rewards_s"] = time.perf_counter() - start
        for callback in self._reward_callbacks():
            callback.on_rollout_batch(self.trainer, self, rollout)

    def score_rollout(self, rollout: Rollout) -> torch.Tensor:
        """Every reward term fused by the weighted power mean. Returns the fused reward ``(N,)`` and
        stores it as ``rollout.rewards['reward']``."""
        self.attach_reward_terms(rollout)
        names = list(rollout.rewards)
        for name in names:
            if torch.isnan(rollout.rewards[name]).any():
                raise ValueError(f"reward term {name!r} holds NaN; fix the reward or its inputs (see the log above)")
        weights = torch.tensor([rollout.reward_weights[n] for n in names])
        if float(weights.sum()) <= 0:
            raise ValueError(f"all reward terms {names} have weight 0; give at least one a positive weight")
        values = torch.stack([rollout.rewards[n] for n in names], dim=1)  # (N, terms)
        fused = power_mean(values, weights, self.reward_p)
        rollout.rewards["reward"] = fused
        return fused

    # ------------------------------------------------------------------ training
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        times = {}
        start = time.perf_counter()
        rollout = self.make_rollout(batch, "train")
        times["time/generate_s"] = time.perf_counter() - start
        start = time.perf_counter()
        rewards = self.score_rollout(rollout)
        times["time/score_s"] = time.perf_counter() - start
        start = time.perf_counter()
        self._steps_this_rollout = 0
        stats = self.update(rollout, rewards.to(self.device))
        times["time/update_s"] = time.perf_counter() - start
        self.rollout_step += 1
        self.log_rollout(rollout, {**stats, **times})

    def update(self, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    def _count_rollout_as_one_step(self) -> None:
        """Make ``trainer.global_step`` count rollouts, not optimiser steps.

        In manual optimisation Lightning advances ``global_step`` on every ``optimizer.step()``, while
        ``val_check_interval`` counts batches; with several mini-batches or iterations per rollout the two
        would drift apart and ``max_steps`` would mean a different thing for GRPO and PPO. One step is one
        rollout everywhere in cepo (``train/optimizer_steps`` logs the other count). Called after each
        optimiser step, so the counter never overshoots mid-rollout.
        """
        self._optimizer_steps += 1
        self._steps_this_rollout += 1
        if self._steps_this_rollout > 1:
            progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.total
            progress.ready -= 1
            progress.completed -= 1

    def rollout_tensors(self, rollout: Rollout, rows=slice(None)):
        return (rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.completion_ids[rows],
                rollout.completion_mask[rows])

    def minibatch_rows(self, n: int) -> list[slice]:
        return micro_batches(n, self.mini_batch_size or n)

    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over devices (identity on one device): loss normalisers must count the global batch so
        that DDP's gradient averaging reproduces the single-device update."""
        if self.trainer.world_size > 1:
            value = self.trainer.strategy.reduce(value.float(), reduce_op="sum")
        return value

    def optimizer_step_with_accumulation(self, micro_losses) -> float:
        """Backward each micro-batch loss (a generator, so graphs are freed one at a time), clip, step.
        Returns the pre-clip gradient norm."""
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        for loss in micro_losses:
            # DDP averages gradients over devices; the normalisers are global sums, so undo the average.
            self.manual_backward(loss * self.trainer.world_size)
        grad_norm = self._grad_norm()
        if self.optim.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.optim.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        self._count_rollout_as_one_step()
        return grad_norm

    def _grad_norm(self) -> float:
        grads = [p.grad.detach().float().norm() for p in self.trainable_parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0

    # ------------------------------------------------------------------ logging
    def log_rollout(self, rollout: Rollout, stats: dict[str, float]) -> None:
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
        metrics.update({k: float(v) for k, v in rollout.stats.items()})
        metrics.update({k: float(v) for k, v in stats.items()})
        values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            values = self.trainer.strategy.reduce(values, reduce_op="mean")
        logged = dict(zip(metrics, values.tolist()))
        self.log_dict({f"train/{k}": v for k, v in logged.items()}, on_step=True, on_epoch=False, sync_dist=False)
        self.log("rollout_step", float(self.rollout_step), on_step=True, on_epoch=False)
        self.log("train/reward", logged["reward_mean"], prog_bar=True, on_step=True, on_epoch=False)
        self._log_completions(rollout)

    @rank_zero_only
    def _log_completions(self, rollout: Rollout) -> None:
        every = max(1, self.trainer.log_every_n_steps)
        if not self.completions_to_log or self.rollout_step % every:
            return
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_text"):
            return
        names = list(rollout.rewards)
        header = "| prompt | completion | answer | gold | " + " | ".join(names) + " |"
        lines = [header, "|" + "---|" * (4 + len(names))]
        for i in range(min(self.completions_to_log, len(rollout))):
            cells = [rollout.prompts[i], rollout.completions[i], rollout.answers[i], " / ".join(rollout.examples[i].gold)]
            cells = [c.replace("|", "\\|").replace("\n", "⏎")[-300:] for c in cells]
            cells += [f"{float(rollout.rewards[n][i]):.3f}" for n in names]
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
            **self.extra_checkpoint_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("cepo")
        if state is None:
            raise ValueError("this checkpoint was not written by cepo (no 'cepo' section); cannot resume from it")
        if state.get("algorithm") != self.algorithm:
            raise ValueError(
                f"checkpoint was written by algorithm {state.get('algorithm')!r}, this run is {self.algorithm!r}"
            )
        self.rollout_step = int(state["rollout_step"])
        self._optimizer_steps = int(state.get("optimizer_steps", 0))
        self._pending_rng = state.get("rng")
        self.load_extra_checkpoint_state(state)

    def extra_checkpoint_state(self) -> dict[str, Any]:
        return {}

    def load_extra_checkpoint_state(self, state: dict[str, Any]) -> None:
        pass

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
        tokenizer to ``path`` (``fit`` writes ``<log_dir>/adapter``)."""
        target = Path(path)
        self.policy.save_pretrained(str(target), selected_adapters=["default"])
        self.tokenizer.save_pretrained(str(target))
        rank_zero_info(f"LoRA adapter written to {target}")


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
    """Group Relative Policy Optimization (Shao et al. 2024) with a LoRA policy.

    Per step: G samples per prompt, rewards fused by the power mean, advantages z-scored within each
    group, clipped surrogate (optionally asymmetric, DAPO), k3 KL to the reference as a loss term.
    """

    algorithm = "grpo"

    def __init__(
        self,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.001,
        scale_rewards: str = "group",
        loss_type: str = "dapo",
        **kwargs,
    ) -> None:
        """
        Args:
            epsilon: Lower clip range of the policy ratio (and upper, unless ``epsilon_high`` is set).
            epsilon_high: Separate upper clip range ("clip-higher", DAPO; e.g. 0.28).
            beta: Coefficient of the k3 KL loss to the reference (CE-PO authors: 0.001). 0 skips the
                reference forward pass.
            scale_rewards: Advantage scaling: ``group`` (divide by the group's std, GRPO), ``batch`` (the
                batch's std) or ``none`` (Dr. GRPO).
            loss_type: Loss aggregation: ``grpo`` (mean per sequence, then over sequences), ``dapo`` (mean
                over all tokens of the mini-batch), ``dr_grpo`` (sum / (sequences x max_new_tokens)).
            **kwargs: Shared options of :class:`CEPOModule` (policy, generation, rewards, ...).
        """
        super().__init__(**kwargs)
        if scale_rewards not in ADVANTAGE_SCALES:
            raise ValueError(f"model.scale_rewards={scale_rewards!r}; choose one of {ADVANTAGE_SCALES}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"model.loss_type={loss_type!r}; choose one of {LOSS_TYPES}")
        if epsilon < 0 or (epsilon_high is not None and epsilon_high < 0) or beta < 0:
            raise ValueError("model.epsilon, model.epsilon_high and model.beta must be >= 0")
        self.epsilon, self.epsilon_high, self.beta = epsilon, epsilon_high, beta
        self.scale_rewards, self.loss_type = scale_rewards, loss_type

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        if self.scale_rewards == "batch" and self.trainer.world_size > 1:
            # The batch std must be the global one for devices to agree with a single-device run.
            centred = group_advantages(rewards, self.group_size, scale="none")
            gathered = self.all_gather(centred).reshape(-1)
            return centred / (gathered.std() + 1e-6)
        return group_advantages(rewards, self.group_size, scale=self.scale_rewards)

    def update(self, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        tensors = self.rollout_tensors(rollout)
        mask = rollout.completion_mask.float()
        temperature = self.generation.temperature
        advantages = self.advantages(rewards)
        stats: dict[str, float] = {"advantage_abs_mean": float(advantages.abs().mean())}
        start = time.perf_counter()
        ref_logp = None
        if self.beta > 0:
            with self.reference_model() as reference:
                ref_logp, _ = batched_logprobs(reference, tensors, self.micro_batch_size, temperature)
        stats["time/reference_s"] = time.perf_counter() - start
        minibatches = self.minibatch_rows(len(rollout))
        # With one optimiser step per rollout the policy has not moved, so the current log-probs
        # (detached) are the old ones and the extra forward pass is skipped.
        need_old = self.num_iterations > 1 or len(minibatches) > 1
        old_logp = batched_logprobs(self.policy, tensors, self.micro_batch_size, temperature)[0] if need_old else None
        totals: dict[str, list[float]] = {}
        for _ in range(self.num_iterations):
            for rows in minibatches:
                normalizer = self.global_sum(loss_normalizer(
                    mask[rows], self.loss_type, self.generation.max_new_tokens
                ))
                step_stats: list[dict[str, torch.Tensor]] = []

                def micro_losses(rows=rows, normalizer=normalizer, step_stats=step_stats):
                    for micro in micro_batches(rows.stop - rows.start, self.micro_batch_size):
                        sub = slice(rows.start + micro.start, rows.start + micro.stop)
                        logp, entropy, _ = completion_logprobs(
                            self.policy, *self.rollout_tensors(rollout, sub), temperature=temperature,
                            with_entropy=True,
                        )
                        old = old_logp[sub] if old_logp is not None else logp.detach()
                        loss, s = grpo_loss(
                            logp, old, advantages[sub], mask[sub], eps_low=self.epsilon,
                            eps_high=self.epsilon_high, beta=self.beta,
                            ref_logp=ref_logp[sub] if ref_logp is not None else None,
                            loss_type=self.loss_type, max_completion_length=self.generation.max_new_tokens,
                            normalizer=normalizer,
                        )
                        s["entropy"] = masked_mean(entropy, mask[sub])
                        s["loss"] = loss.detach()
                        if "policy_loss" in s:  # report the global value: DDP averages the scaled parts
                            s["policy_loss"] = s["policy_loss"] * self.trainer.world_size
                        s["loss"] = s["loss"] * self.trainer.world_size
                        step_stats.append(s)
                        yield loss

                grad_norm = self.optimizer_step_with_accumulation(micro_losses())
                totals.setdefault("grad_norm", []).append(grad_norm)
                for key in step_stats[0]:
                    values = torch.stack([s[key].float() for s in step_stats])
                    # the loss is already normalised by the whole mini-batch: micro parts add up
                    totals.setdefault(key, []).append(float(values.sum() if key in ("loss", "policy_loss") else values.mean()))
        stats.update({key: sum(v) / len(v) for key, v in totals.items()})
        return stats
