"""Which network a network reward scores with: the frozen reference, the current policy, or a lagged copy.

``network: policy`` lets the policy grade its own completions with its own gradients, which the policy
can then learn to game: one seed of three collapsed on the first testbed, its S_XY falling to about 0.
``network: lagged`` is a guard between the two: the policy's LoRA weights as they were at the last
refresh, refreshed every ``lag_steps`` rollout steps. Within a window the scoring network does not move
with the update it rewards, so a change of the policy that only raises its own score is not rewarded
until the next refresh, while the scorer still follows the policy over the run (unlike the reference).

The lagged copy is a snapshot of the trained adapter's tensors swapped into the adapter while scoring
(no second adapter is registered, so checkpoints keep their layout); the reward callback keeps the
snapshot in its own checkpoint state, so a resumed run scores as an uninterrupted one.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

NETWORKS = ("reference", "policy", "lagged")
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


def check_network(owner: str, network: str, lag_steps: int | None) -> None:
    """Refuse an unknown network name, and a lag on a network that has none, naming the fix."""
    if network not in NETWORKS:
        raise ValueError(
            f"{owner}: network={network!r} is not supported; use 'reference' (the frozen initial policy), "
            "'policy' (the current policy) or 'lagged' (the policy as it was up to lag_steps rollout steps ago)"
        )
    if network == "lagged" and (lag_steps is None or lag_steps < 1):
        raise ValueError(f"{owner}: network='lagged' needs lag_steps >= 1, got {lag_steps!r}")


@contextmanager
def scoring_network(module, network: str, lagged: LaggedPolicy | None = None, step: int = 0):
    """The network a network reward scores with at rollout step ``step``: the one place where
    ``reference``, ``policy`` and ``lagged`` are told apart."""
    if network == "reference":
        with module.reference_model() as net:
            yield net
    elif network == "policy":
        yield module.policy
    elif network == "lagged":
        if lagged is None:
            raise ValueError("network='lagged' needs the reward's LaggedPolicy")
        lagged.refresh_if_due(module.policy, step)
        with lagged.applied(module.policy) as net:
            yield net
    else:
        check_network("scoring_network", network, None)
