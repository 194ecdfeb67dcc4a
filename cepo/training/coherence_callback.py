"""Attaches the three coherence channel scores to every rollout batch as reward terms."""

from __future__ import annotations

import time

import lightning as L

from cepo.coherence.scorer import CHANNELS, CoherenceScorer
from cepo.records import Rollout
from cepo.rewards.base import NetworkReward
from cepo.policy.lagged import LaggedPolicy
from cepo.rewards.network import NetworkName, check_network, lagged_copy, score_coherence


class CoherenceRewardCallback(L.Callback, NetworkReward):
    """The CE-PO coherence reward: scores each rollout's (prompt, rationale, answer) with the Jacobian
    channels S_ZX, S_XY and S_ZY and adds them as the reward terms ``coherence_zx``, ``coherence_xy`` and
    ``coherence_zy``, which the power-mean combiner fuses with accuracy.

    A :class:`~cepo.rewards.base.NetworkReward`: the LightningModule finds it among the trainer's callbacks
    and calls :meth:`score_rollout` with the rollout step between generation and the update.
    """

    def __init__(
        self,
        scorer: CoherenceScorer | None = None,
        network: NetworkName = "reference",
        weight_zx: float = 0.1,
        weight_xy: float = 0.1,
        weight_zy: float = 0.1,
        score_during_eval: bool = False,
        lag_steps: int = 10,
    ) -> None:
        """
        Args:
            scorer: The coherence scorer (micro-batch size, number and kind of counterfactuals, token
                caps, floor, hardened or naive). Default: ``CoherenceScorer()``, K = 4 word shuffles.
            network: Which network's gradients are scored: ``"reference"`` (the frozen initial policy,
                the authors' choice: the LoRA policy with its adapter disabled, or a frozen starting
                adapter), ``"policy"`` (the current policy) or ``"lagged"`` (the policy as it was at the last
                refresh, every ``lag_steps`` rollout steps: a guard against the policy gaming its own score).
            weight_zx: Combiner weight of S_ZX, the rationale's dependence on the prompt (0 = logged
                only).
            weight_xy: Combiner weight of S_XY, the answer's dependence on the rationale (0 = logged
                only).
            weight_zy: Combiner weight of S_ZY, the answer's direct dependence on the prompt (0 =
                logged only).
            score_during_eval: Also score validation/test rollouts (costs one Jacobian pass per batch).
            lag_steps: Rollout steps between refreshes of the lagged copy (``network: lagged`` only; see
                :mod:`cepo.policy.lagged`).
        """
        super().__init__()
        check_network("CoherenceRewardCallback", network)
        for name, weight in (("weight_zx", weight_zx), ("weight_xy", weight_xy), ("weight_zy", weight_zy)):
            if not weight >= 0:
                raise ValueError(f"CoherenceRewardCallback: {name} must be >= 0, got {weight}; set {name} to 0 "
                                 "to log the channel without rewarding it, or to a positive weight (the CE-PO "
                                 "preset uses 0.1)")
        self.scorer = scorer if scorer is not None else CoherenceScorer()
        self.network = network
        self.lagged = LaggedPolicy(lag_steps) if network == "lagged" else None
        self.weights = {"zx": float(weight_zx), "xy": float(weight_xy), "zy": float(weight_zy)}
        self.score_during_eval = score_during_eval

    def score_rollout(self, pl_module: L.LightningModule, rollout: Rollout, step: int) -> None:
        """Score ``rollout`` at rollout step ``step`` and attach the three reward terms and their diagnostics."""
        if rollout.stage != "train" and not self.score_during_eval:
            return
        start = time.perf_counter()
        with lagged_copy(pl_module, self.lagged, step):
            result = score_coherence(pl_module, self.network, self.scorer, rollout.examples, rollout.prompts,
                                     rollout.rationales, rollout.answers, step)
        for channel in CHANNELS:
            rollout.add_reward(f"coherence_{channel}", getattr(result, channel), self.weights[channel])
        for key, values in result.diagnostics.items():
            if values.numel():
                rollout.stats[f"coherence/{key}"] = float(values.float().mean())
        rollout.stats["time/coherence_s"] = time.perf_counter() - start

    def state_dict(self) -> dict:
        """The lagged copy (``network: lagged``), so a resumed run scores with the same weights."""
        return {"lagged": self.lagged.state_dict()} if self.lagged is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.lagged is not None and "lagged" in state_dict:
            self.lagged.load_state_dict(state_dict["lagged"])
