"""The optimiser side of the training module: AdamW and its schedule over the trainable (LoRA and value)
parameters, one optimiser step accumulated over micro-batch losses with the gradient norm measured and
clipped, and the sums over devices that make data parallelism reproduce the single-device update.

:class:`Optimisation` is a mixin of :class:`~cepo.training.module.CEPOModule`.
"""

from __future__ import annotations

import math

import torch

from cepo.training.module_state import fold_optimizer_steps


class Optimisation:
    """Optimiser, schedule, accumulation and cross-device sums (a mixin of the LightningModule)."""

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
