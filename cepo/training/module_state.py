"""The training module's state across checkpoints and Lightning's step counters: only the trainable weights
in ``state_dict``, cepo's own section of the checkpoint (rollout step, optimiser steps, algorithm, every RNG
stream, the KL controller), restored so a resumed run continues as the uninterrupted one would, and the
one place that touches Lightning's private progress counters (:func:`fold_optimizer_steps`).

:class:`CheckpointState` is a mixin of :class:`~cepo.training.module.CEPOModule`.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from cepo.policy.loading import check_finite
from cepo.rl.kl import FixedKLController
from cepo.training.checkpoint_meta import check_policy_record, check_shapes, policy_record


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


class CheckpointState:
    """Checkpoint contents and resume (a mixin of the LightningModule)."""

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
        check_shapes(state_dict, dict(self.named_parameters()))
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cepo"] = {
            "rollout_step": self.rollout_step,
            "optimizer_steps": self._optimizer_steps,
            "algorithm": self.algorithm,
            "rng": _rng_state(),
            "kl_controller": {"kind": self._kl_controller_kind(), **self.kl_controller.state_dict()},
        }
        if self.policy is not None:  # a module saved before setup has no adapter to describe
            checkpoint["cepo"]["policy"] = policy_record(self.policy, self.policy_config)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("cepo")
        if state is None:
            raise ValueError("this checkpoint was not written by cepo (no 'cepo' section); cannot resume from it")
        stage = self.trainer.state.fn if self._trainer is not None else None
        evaluating = stage in ("validate", "test", "predict")  # the algorithm and data options do not apply
        check_finite(checkpoint.get("state_dict", {}), "checkpoint",
                     "the run that wrote it diverged; use an earlier checkpoint of that run")
        if "policy" in state and self.policy is not None:
            check_policy_record(state["policy"], policy_record(self.policy, self.policy_config),
                                resuming=stage == "fit")
        if not evaluating and state.get("algorithm") != self.algorithm:
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
