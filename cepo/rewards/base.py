"""Reward functions: objects listed in the config, each producing one named term per rollout row.

A new reward is a subclass of :class:`RewardFunction` that implements ``score``; list it in the YAML
under ``model.init_args.rewards`` (an overlay adds it with ``rewards+:``) with ``class_path``/``init_args``
and it is computed, logged on its own and fused with the other terms by the power-mean combiner, with no
other code change. A reward that needs the network (gradients or log-probs of the policy or the reference)
subclasses :class:`NetworkReward` instead and is listed under ``trainer.callbacks``.

Every term must be finite and lie in [0, 1], the combiner's domain: other values are refused with the
reward's name rather than clipped silently.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cepo.answers.matching import answers_match
from cepo.records import Rollout


def check_reward_values(name: str, values: Tensor) -> None:
    """Refuse NaN, infinite and out-of-range values of the term ``name``: the power mean is defined on
    [0, 1], and clipping a reward of 90 to 1 (or inf to 1) would silently change what is optimised."""
    values = torch.as_tensor(values)
    bad = ~torch.isfinite(values)
    if bad.any():
        rows = torch.nonzero(bad).flatten()[:5].tolist()
        raise ValueError(
            f"reward {name!r} returned a non-finite value ({values[bad][0].item()}) for rows {rows}; a reward "
            "must return a finite number in [0, 1] for every completion (score unparseable output as 0)."
        )
    outside = (values < 0) | (values > 1)
    if outside.any():
        rows = torch.nonzero(outside).flatten()[:5].tolist()
        raise ValueError(
            f"reward {name!r} returned {values[outside][0].item():g} (rows {rows}), outside [0, 1], the domain "
            "of the power-mean combiner; rescale the reward to [0, 1] (e.g. divide by its maximum)."
        )


class NetworkReward:
    """Base class of rewards that need the network: they read gradients or log-probs of the policy or of the
    frozen reference, so they cannot be a plain function of the rollout's text.

    Such a reward is a Lightning callback listed under ``trainer.callbacks`` (so it can hook into the rest
    of the run) that also subclasses this class; the training module finds it by type and, for every
    rollout (training, and evaluation if the reward wants it), after the :class:`RewardFunction` terms,
    calls :meth:`score_rollout`. :class:`cepo.training.coherence_callback.CoherenceRewardCallback` is one.
    """

    def score_rollout(self, module, rollout: Rollout, step: int) -> None:
        """Attach this reward's terms to ``rollout`` with ``rollout.add_reward(name, values, weight)``.

        Args:
            module: The training module: ``module.policy`` (the LoRA policy), ``module.tokenizer`` and the
                context manager ``module.reference_model()`` (the frozen reference network). Under DDP use
                these attributes, not the trainer's wrapped model.
            rollout: The rollout batch (``rollout.stage`` is ``"train"``, ``"eval"``, ...).
            step: The rollout step: the number of rollouts trained on before this one. Seed any
                randomness from it (and the content), so a resumed run scores as an uninterrupted one.
        """
        raise NotImplementedError


class RewardFunction:
    """Base class. ``score`` returns one value in [0, 1] per rollout row (anything else is an error)."""

    default_name = "reward"

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        """
        Args:
            weight: Weight of this term in the combiner (0 = computed and logged, not optimised).
            name: Name of the term in logs (defaults to the class's own name).
        """
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"{type(self).__name__}: weight must be a finite number >= 0, got {weight}; set init_args.weight "
                "to 0 to log the term without optimising it, or to a positive number"
            )
        self.weight = float(weight)
        self.name = name or self.default_name

    def score(self, rollout: Rollout) -> Tensor:
        raise NotImplementedError

    def __call__(self, rollout: Rollout) -> Tensor:
        values = torch.as_tensor(self.score(rollout), dtype=torch.float32).reshape(-1)
        check_reward_values(self.name, values)
        return values


class AccuracyReward(RewardFunction):
    """1 when the parsed answer Y matches a gold answer under the example's matching rule, else 0."""

    default_name = "accuracy"

    def score(self, rollout: Rollout) -> Tensor:
        return torch.tensor(
            [
                float(answers_match(answer, ex.gold, ex.answer_kind, options=ex.meta.get("options")))
                for answer, ex in zip(rollout.answers, rollout.examples)
            ]
        )


class FormatReward(RewardFunction):
    """1 when the completion marks its answer with the marker the prompt asked for, and was not truncated."""

    default_name = "format"

    def score(self, rollout: Rollout) -> Tensor:
        return (rollout.marker_found & ~rollout.truncated.cpu()).float()


def refuse_doubled_rewards(callbacks) -> None:
    """Refuse a callback list that holds one kind of network reward twice (two reward presets stacked):
    its reward terms would be attached twice."""
    kinds = [type(callback).__name__ for callback in callbacks if isinstance(callback, NetworkReward)]
    doubled = sorted({kind for kind in kinds if kinds.count(kind) > 1})
    if doubled:
        raise ValueError(
            f"trainer.callbacks holds {', '.join(doubled)} more than once, so its reward terms would be attached "
            "twice; each reward preset appends its own (configs/rewards/*.yaml, "
            "configs/experiments/cepo_policy_network.yaml): use one preset, re-weight terms by name in "
            "model.reward_weights, and change the callback's options with --trainer.callbacks.<option>"
        )
