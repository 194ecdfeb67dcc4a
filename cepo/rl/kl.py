"""Per-token estimators of KL(pi || pi_ref) and the KL coefficient controllers.

Each estimator is a pure function ``(logp, ref_logp) -> (B, T)`` of the log-probs of the *sampled* tokens
under the policy and the reference, registered by name in :data:`KL_ESTIMATORS`. With
``r = ref_logp - logp`` (the log of the ratio pi_ref / pi at the sampled token), Schulman's note
"Approximating KL divergence" (2020) gives three estimators of KL(pi || pi_ref) for samples from pi:

- ``k1 = -r``: unbiased, high variance, can be negative (the per-token penalty of Ziegler et al. 2019);
- ``k2 = r^2 / 2``: biased, low variance, always >= 0;
- ``k3 = exp(r) - r - 1``: unbiased and always >= 0 (GRPO's KL loss term, Shao et al. 2024).

The controllers (fixed, and the adaptive one of Ziegler et al. 2019) steer the coefficient of the KL term.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from cepo.registry import Registry

KLEstimator = Callable[[Tensor, Tensor], Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def k1_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``log pi - log pi_ref`` per token: the plain log-ratio (Schulman 2020, k1)."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def k2_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``(log pi - log pi_ref)^2 / 2`` per token (Schulman 2020, k2)."""
    return 0.5 * (logp - ref_logp) ** 2


@KL_ESTIMATORS.register("k3")
def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``exp(r) - r - 1`` with ``r = ref_logp - logp`` per token (Schulman 2020, k3; GRPO's KL loss).

    ``expm1`` keeps the small-``r`` regime accurate, and the clamp removes rounding residues below zero.
    """
    r = ref_logp - logp
    return (torch.expm1(r) - r).clamp_min(0.0)


KLEstimatorName = KL_ESTIMATORS.literal()


class FixedKLController:
    """A KL coefficient that never changes; same interface as :class:`AdaptiveKLController`."""

    def __init__(self, value: float) -> None:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"KL coefficient must be finite and non-negative, got {value}")
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Do nothing: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019, steering the measured KL towards ``target``.

    After each batch, ``update(current_kl, n_steps)`` applies

        error = clip(current_kl / target - 1, -0.2, 0.2)
        value *= 1 + error * n_steps / horizon

    so the coefficient grows when the policy drifts further than ``target`` from the reference and shrinks
    when it stays closer; the clip bounds the change per ``horizon`` steps to 20 %. ``n_steps`` is the
    number of samples (episodes) in the batch; a step so large that the factor would fall below 0 sets the
    coefficient to 0 rather than making it negative. Only ``value`` evolves, so only it is checkpointed:
    ``target`` and ``horizon`` come from the configuration of the resumed run.
    """

    def __init__(self, init_value: float, target: float, horizon: int) -> None:
        if not math.isfinite(init_value) or init_value < 0:
            raise ValueError(f"init_value (the initial KL coefficient) must be finite and >= 0, got {init_value}")
        if not target > 0:
            raise ValueError(f"target (the KL to steer towards) must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon (samples over which the coefficient adapts) must be > 0, got {horizon}")
        self.value = float(init_value)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient by the clipped proportional error of ``current_kl`` against the target."""
        if n_steps < 0:
            raise ValueError(f"n_steps must be non-negative, got {n_steps}")
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= max(1.0 + error * n_steps / self.horizon, 0.0)

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
