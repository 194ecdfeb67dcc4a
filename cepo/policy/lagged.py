"""A lagged copy of the policy's trained LoRA weights, refreshed every ``lag_steps`` rollout steps.

``network: policy`` lets the policy grade its own completions with its own gradients, which the policy
can then learn to game: on the first testbed one seed of three collapsed, GRPO's z-scoring of all-right
groups turning the policy's own preference for degenerate text into full-size advantages. A scorer that
is the policy as it was at the last refresh does not move with the update it rewards, while it still
follows the policy over the run (unlike the frozen reference). ``network: lagged`` in
:mod:`cepo.rewards.network` scores with it.

The copy is a snapshot of the trained adapter's tensors swapped into the adapter while scoring (no second
adapter is registered, so checkpoints keep their layout); the reward that keeps it saves it in its own
checkpoint state, so a resumed run scores as an uninterrupted one.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

TRAINED_ADAPTER = "default"


def _trained_lora(policy) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters of the trained adapter, by name."""
    key = f".{TRAINED_ADAPTER}."
    return {name: p for name, p in policy.named_parameters() if "lora_" in name and key in name}


class LaggedPolicy:
    """A copy of the trained LoRA weights, refreshed every ``lag_steps`` rollout steps."""

    def __init__(self, lag_steps: int) -> None:
        if not isinstance(lag_steps, int) or lag_steps < 1:
            raise ValueError(f"lag_steps must be an integer >= 1 (rollout steps between refreshes), got {lag_steps!r}")
        self.lag_steps = lag_steps
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.refreshed_at: int | None = None

    def due(self, step: int) -> bool:
        return self.snapshot is None or self.refreshed_at is None or step - self.refreshed_at >= self.lag_steps

    def refresh_if_due(self, policy, step: int) -> bool:
        """Copy the policy's current LoRA weights if ``lag_steps`` steps passed since the last copy (or
        there is none); returns whether it copied."""
        if not self.due(step):
            return False
        params = _trained_lora(policy)
        if not params:
            raise ValueError("network: lagged needs a LoRA policy with a trained adapter named 'default'")
        self.snapshot = {name: p.detach().clone() for name, p in params.items()}
        self.refreshed_at = int(step)
        return True

    @contextmanager
    def applied(self, policy):
        """The policy with the snapshot's weights in its trained adapter; the current weights are put back
        on exit (also after an error)."""
        if self.snapshot is None:
            raise RuntimeError("LaggedPolicy.applied before any refresh: call refresh_if_due(policy, step) first")
        params = _trained_lora(policy)
        missing = sorted(set(self.snapshot) - set(params))
        if missing:
            raise RuntimeError(f"the lagged snapshot has LoRA weights the policy lacks: {missing[:3]}")
        current = {name: params[name].detach().clone() for name in self.snapshot}
        with torch.no_grad():
            for name, value in self.snapshot.items():
                params[name].copy_(value)
        try:
            yield policy
        finally:
            with torch.no_grad():
                for name, value in current.items():
                    params[name].copy_(value)

    def state_dict(self) -> dict:
        return {"lag_steps": self.lag_steps, "refreshed_at": self.refreshed_at,
                "snapshot": {k: v.cpu() for k, v in (self.snapshot or {}).items()}}

    def load_state_dict(self, state: dict) -> None:
        self.refreshed_at = state.get("refreshed_at")
        snapshot = state.get("snapshot") or {}
        self.snapshot = dict(snapshot) if snapshot else None
