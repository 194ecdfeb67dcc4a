"""The one path by which a network reward is computed: which network scores, what the scorer is given.

Training (:class:`~cepo.training.coherence_callback.CoherenceRewardCallback`,
:class:`~cepo.training.interventional_callback.InterventionalRewardCallback`), ``cepo predict
--prediction.coherence true`` and the reward diagnostics all call :func:`score_coherence` and
:func:`score_interventional`, so one rollout gets one score wherever it is scored:

- the network is looked up by name in :data:`SCORING_NETWORKS` (``reference``: the frozen initial policy;
  ``policy``: the current one; ``lagged``: the policy as it was at the last refresh of a copy that the
  reward keeps, :class:`~cepo.policy.lagged.LaggedPolicy`, refreshed every ``lag_steps`` rollout steps
  and handed over with :func:`lagged_copy`);
- shuffled prompts perturb each example's question, not the template around it (:func:`prompt_contents`);
- the counterfactual draws and their number K are the scorer's own (``num_counterfactuals``, drawn by
  :func:`cepo.coherence.counterfactuals.draw_rollout_counterfactuals` from the scorer's seed and ``step``).

A new network is one function ``module -> context manager yielding the network`` registered with
``@SCORING_NETWORKS.register("name")``; ``module`` is the training module (``module.policy``,
``module.reference_model()``, ``module.tokenizer``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from cepo.coherence.interventional import InterventionalResult, InterventionalScorer
from cepo.coherence.scorer import CoherenceResult, CoherenceScorer
from cepo.policy.lagged import LaggedPolicy
from cepo.registry import Registry

NetworkChoice = Callable[[Any], AbstractContextManager[nn.Module]]
SCORING_NETWORKS: Registry[NetworkChoice] = Registry("scoring network")


@SCORING_NETWORKS.register("reference")
def reference_network(module) -> AbstractContextManager[nn.Module]:
    """The frozen initial policy: the LoRA policy with its adapter disabled, or a frozen starting adapter."""
    return module.reference_model()


@SCORING_NETWORKS.register("policy")
@contextmanager
def policy_network(module) -> Iterator[nn.Module]:
    """The current policy (the module's own attribute: under DDP the trainer's model may be wrapped)."""
    yield module.policy


# The module attribute through which a reward hands its lagged copy to the "lagged" network while it scores.
LAGGED_ATTRIBUTE = "lagged_scoring_copy"


@SCORING_NETWORKS.register("lagged")
def lagged_network(module) -> AbstractContextManager[nn.Module]:
    """The policy with the weights of the scoring reward's lagged copy (a guard against the policy gaming
    its own score: the scorer does not move with the update it rewards)."""
    lagged = getattr(module, LAGGED_ATTRIBUTE, None)
    if lagged is None:
        raise RuntimeError(
            "network 'lagged' scores with a copy that the reward keeps: use it through CoherenceRewardCallback or "
            "InterventionalRewardCallback with network: lagged (and lag_steps), which hand it over with lagged_copy()"
        )
    return lagged.applied(module.policy)


@contextmanager
def lagged_copy(module, lagged: LaggedPolicy | None, step: int) -> Iterator[None]:
    """While scoring at rollout step ``step``: refresh ``lagged`` if ``lag_steps`` steps have passed and make
    it the copy the ``lagged`` network uses (nothing to do when ``lagged`` is None)."""
    if lagged is None:
        yield
        return
    lagged.refresh_if_due(module.policy, int(step))
    object.__setattr__(module, LAGGED_ATTRIBUTE, lagged)
    try:
        yield
    finally:
        object.__delattr__(module, LAGGED_ATTRIBUTE)


# The names a config may give (``--help`` lists them): every network registered above.
NetworkName = SCORING_NETWORKS.literal()


def check_network(owner: str, network: str) -> str:
    """``network`` if it names a registered scoring network, else an error naming ``owner`` and the choices."""
    if network not in SCORING_NETWORKS:
        raise ValueError(
            f"{owner}: network={network!r} is not supported; choose one of {', '.join(SCORING_NETWORKS.names())} "
            "('reference' is the frozen initial policy, 'policy' the current one, 'lagged' the policy as it was up "
            "to lag_steps rollout steps ago)"
        )
    return network


def prompt_contents(examples: Sequence[object]) -> list[str | None]:
    """The part of each prompt that shuffled prompts perturb: the example's question, not the chat template
    or instruction frame around it (None where a row has no question)."""
    return [getattr(example, "question", None) for example in examples]


@contextmanager
def _on_network(module, network: str) -> Iterator[nn.Module]:
    # The scorers differentiate: predict runs under inference mode, so gradients are switched back on here.
    with torch.inference_mode(False), torch.enable_grad(), SCORING_NETWORKS[network](module) as net:
        yield net


def score_coherence(module, network: str, scorer: CoherenceScorer, examples: Sequence[object],
                    prompts: Sequence[str], rationales: Sequence[str], answers: Sequence[str],
                    step: int, draw_as: Sequence[tuple[str, str, str]] | None = None) -> CoherenceResult:
    """The Jacobian channels S_ZX, S_XY, S_ZY of rollouts ``(prompts[i], rationales[i], answers[i])`` of
    ``examples[i]``, on ``network``, with the scorer's own counterfactual draws at rollout step ``step``
    (``draw_as``: see :meth:`~cepo.coherence.scorer.CoherenceScorer.score`)."""
    with _on_network(module, network) as net:
        return scorer.score(net, module.tokenizer, list(prompts), list(rationales), list(answers), step=int(step),
                            prompt_contents=prompt_contents(examples), draw_as=draw_as)


def score_interventional(module, network: str, scorer: InterventionalScorer, prompts: Sequence[str],
                         rationales: Sequence[str], answers: Sequence[str], step: int) -> InterventionalResult:
    """S_do (and S_med if the scorer computes it) of the rollouts on ``network``, with the scorer's own
    rationale edits at rollout step ``step``."""
    with _on_network(module, network) as net:
        return scorer.score(net, module.tokenizer, list(prompts), list(rationales), list(answers), step=int(step))
