"""Attaches the interventional coherence channels (beyond the paper) to rollout batches as reward terms."""

from __future__ import annotations

import time

import lightning as L

from cepo.coherence.interventional import InterventionalScorer
from cepo.records import Rollout
from cepo.rewards.base import NetworkReward
from cepo.policy.lagged import LaggedPolicy
from cepo.rewards.network import NetworkName, check_network, lagged_copy, score_interventional


class InterventionalRewardCallback(L.Callback, NetworkReward):
    """Adds ``coherence_do`` (S_do: how much the answer's likelihood drops when the rationale's conclusion
    is edited) and, if the scorer computes it, ``coherence_med`` (S_med: the share of the answer's input
    gradient on the rationale) as reward terms, fused with the others by the power mean.

    An option next to the paper's ``CoherenceRewardCallback``, not a replacement; both may be configured.
    A :class:`~cepo.rewards.base.NetworkReward`: the LightningModule calls :meth:`score_rollout` with the
    rollout step between generation and the update.
    """

    def __init__(
        self,
        scorer: InterventionalScorer | None = None,
        network: NetworkName = "reference",
        weight_do: float = 0.1,
        weight_med: float = 0.0,
        score_during_eval: bool = False,
        lag_steps: int = 10,
    ) -> None:
        """
        Args:
            scorer: The interventional scorer (number and kind of rationale edits, mediation on/off, caps,
                floor). Default: ``InterventionalScorer()``, K = 2 conclusion edits, mediation on.
            network: Which network scores: ``"reference"`` (the frozen initial policy), ``"policy"`` or
                ``"lagged"`` (the policy as it was at the last refresh, every ``lag_steps`` rollout steps).
            weight_do: Combiner weight of S_do (0 = logged only).
            weight_med: Combiner weight of S_med (0 = logged only; ignored when the scorer has
                ``mediation: false``).
            score_during_eval: Also score validation/test rollouts.
            lag_steps: Rollout steps between refreshes of the lagged copy (``network: lagged`` only; see
                :mod:`cepo.policy.lagged`).
        """
        super().__init__()
        check_network("InterventionalRewardCallback", network)
        for name, weight in (("weight_do", weight_do), ("weight_med", weight_med)):
            if not weight >= 0:
                raise ValueError(f"InterventionalRewardCallback: {name} must be >= 0, got {weight}; set {name} to "
                                 "0 to log the term without rewarding it, or to a positive weight")
        self.scorer = scorer if scorer is not None else InterventionalScorer()
        if weight_med > 0 and not self.scorer.mediation:
            raise ValueError("InterventionalRewardCallback: weight_med > 0 needs scorer.mediation: true")
        self.network = network
        self.lagged = LaggedPolicy(lag_steps) if network == "lagged" else None
        self.weights = {"do": float(weight_do), "med": float(weight_med)}
        self.score_during_eval = score_during_eval

    def score_rollout(self, pl_module: L.LightningModule, rollout: Rollout, step: int) -> None:
        """Score ``rollout`` at rollout step ``step`` (which seeds the edits) and attach the terms."""
        if rollout.stage != "train" and not self.score_during_eval:
            return
        start = time.perf_counter()
        with lagged_copy(pl_module, self.lagged, step):
            result = score_interventional(pl_module, self.network, self.scorer, rollout.prompts,
                                          rollout.rationales, rollout.answers, step)
        rollout.add_reward("coherence_do", result.interventional, self.weights["do"])
        if result.mediation is not None:
            rollout.add_reward("coherence_med", result.mediation, self.weights["med"])
        for key, values in result.diagnostics.items():
            if values.numel():
                rollout.stats[f"interventional/{key}"] = float(values.float().mean())
        rollout.stats["time/interventional_s"] = time.perf_counter() - start

    def state_dict(self) -> dict:
        """The lagged copy (``network: lagged``), so a resumed run scores with the same weights."""
        return {"lagged": self.lagged.state_dict()} if self.lagged is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.lagged is not None and "lagged" in state_dict:
            self.lagged.load_state_dict(state_dict["lagged"])
