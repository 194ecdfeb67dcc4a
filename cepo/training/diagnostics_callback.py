"""The reward diagnostics in a run: score the evaluation sources' faithful/unfaithful completion pairs
(:mod:`cepo.evaluation.diagnostics`) with every reward channel on the reference and the current network.

:class:`RewardDiagnostics` runs at the end of ``cepo validate``/``cepo test`` (and at validations during
``fit``), logs ``<stage>/diagnostics/<pair set>/<network>/<channel>/{auc,diff}`` and appends one JSON line
per (pair set, network, channel) to ``<log_dir>/<stage>_diagnostics.jsonl``. The channels are scored by
the same path as the training rewards (:mod:`cepo.rewards.network`) and fused by the same function
(:func:`cepo.rewards.combiner.fuse_terms`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor

from cepo.coherence.interventional import InterventionalScorer
from cepo.coherence.scorer import CHANNELS, CoherenceScorer
from cepo.evaluation.diagnostics import DEFAULT_KINDS, build_pair_sets, format_diagnostics, pair_statistics
from cepo.records import Rollout
from cepo.rewards.base import NetworkReward
from cepo.rewards.combiner import fuse_terms
from cepo.rewards.network import SCORING_NETWORKS, NetworkName, check_network, score_coherence, score_interventional


def _marked(answer: str, marker: str) -> str:
    """``answer`` wrapped in the answer marker the prompt asks for, so the parser finds it."""
    if marker == "boxed":
        return f"\\boxed{{{answer}}}"
    if marker == "gsm8k":
        return f"\n#### {answer}"
    return f"<{marker}>{answer}</{marker}>"


class RewardDiagnostics(L.Callback):
    """Pairwise diagnostics of every reward channel at the end of each validation/test run.

    Channels: the Jacobian channels ``zx``, ``xy``, ``zy`` (the configured ``CoherenceRewardCallback``'s
    scorer, or a default one), ``do`` and ``med`` (the configured ``InterventionalRewardCallback``'s
    scorer, or a default one; ``interventional: false`` leaves them out), ``fused`` (the run's power mean
    of every term with the run's weights, ``model.reward_weights`` overrides included, and ``reward_p``;
    accuracy and the other reward functions scored on each member) and ``fused_same_accuracy`` (the same
    with the unfaithful member given the faithful member's reward-function terms: what a GRPO group of
    equally right samples sees). Each pair member is scored as a rollout of its example at rollout step
    ``seed`` would be in training (the question is what shuffled prompts perturb, the counterfactuals are
    the scorer's own draws), except that both members draw their counterfactuals as the faithful member
    does, so the pair differs only in the part the pair set changes. Terms of other reward callbacks are not known here and are left out of the
    fused reward (a warning names them). Under data parallelism every rank scores the same pairs (the work
    is deterministic and small next to a validation) and rank zero writes the file.
    """

    def __init__(
        self,
        networks: list[NetworkName] | None = None,
        kinds: list[Literal["cue", "edited_rationale", "opposite_wording", "dropped_carry"]] | None = None,
        max_pairs: int = 64,
        interventional: bool = True,
        during_fit: Literal["all", "last", "none"] = "all",
        seed: int = 0,
    ) -> None:
        """
        Args:
            networks: Networks to score: ``reference`` (the frozen initial policy) and/or ``policy`` (the
                current one). Default: both.
            kinds: Pair kinds: ``cue``, ``edited_rationale``, ``opposite_wording``, ``dropped_carry``.
                Default: the first three, where the evaluation sources support them.
            max_pairs: Pairs per pair set (the first ones in file order).
            interventional: Also report the interventional channels S_do and S_med.
            during_fit: At which validations of ``fit`` to run: ``all``, ``last`` (only the one at
                ``trainer.max_steps``) or ``none``. ``validate`` and ``test`` always run.
            seed: Seed of the edited rationales, and the rollout step whose counterfactual draws the
                scorers use (fixed across evaluations, so a change between steps is the network's).
        """
        super().__init__()
        self.networks = list(networks) if networks is not None else ["reference", "policy"]
        if not self.networks:
            raise ValueError(f"RewardDiagnostics.networks is empty; choose from {SCORING_NETWORKS.names()}")
        for network in self.networks:
            check_network("RewardDiagnostics.networks", network)
            if network == "lagged":
                raise ValueError("RewardDiagnostics.networks: 'lagged' is a copy that a training reward keeps, not a "
                                 "network of its own; diagnose 'policy' (the current weights) or 'reference'")
        self.kinds = list(kinds) if kinds is not None else list(DEFAULT_KINDS)
        build_pair_sets({}, self.kinds)  # validates the kinds
        if max_pairs < 1:
            raise ValueError(f"RewardDiagnostics.max_pairs must be >= 1, got {max_pairs}")
        if during_fit not in ("all", "last", "none"):
            raise ValueError(f"RewardDiagnostics.during_fit={during_fit!r}; choose all, last or none")
        self.max_pairs, self.interventional, self.during_fit, self.seed = max_pairs, interventional, during_fit, seed
        self.last_results: list[dict] = []

    # ------------------------------------------------------------------ hooks
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit":
            last = int(getattr(pl_module, "rollout_step", 0)) >= int(trainer.max_steps or 0)
            if self.during_fit == "none" or (self.during_fit == "last" and not last):
                return
        self.run(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module, "test")

    # ------------------------------------------------------------------ work
    def _configured(self, trainer) -> tuple[NetworkReward | None, NetworkReward | None, list[str]]:
        """The first configured coherence and interventional rewards, and the names of other reward callbacks."""
        coherence = interventional = None
        unknown = []
        for cb in trainer.callbacks:
            if not isinstance(cb, NetworkReward) or cb is self:
                continue
            if isinstance(getattr(cb, "scorer", None), CoherenceScorer) and coherence is None:
                coherence = cb
            elif isinstance(getattr(cb, "scorer", None), InterventionalScorer) and interventional is None:
                interventional = cb
            else:
                unknown.append(type(cb).__name__)
        return coherence, interventional, unknown

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> list[dict]:
        start = time.perf_counter()
        datamodule = trainer.datamodule
        if hasattr(datamodule, "eval_examples"):
            examples = datamodule.eval_examples(stage)
        else:
            sources = datamodule.test_sources if stage == "test" else datamodule.val_sources
            examples = {s.name: s.load() for s in sources}
        pair_sets = build_pair_sets(examples, self.kinds, self.max_pairs, self.seed)
        if not pair_sets:
            rank_zero_warn("RewardDiagnostics: no evaluation source supports any pair kind; nothing to report")
            return []
        coherence_cb, interventional_cb, unknown = self._configured(trainer)
        if unknown:
            rank_zero_warn(f"RewardDiagnostics: the fused reward leaves out the terms of reward callbacks {unknown}")
        coherence = coherence_cb.scorer if coherence_cb is not None else CoherenceScorer()
        c_weights = coherence_cb.weights if coherence_cb is not None else {c: 0.0 for c in CHANNELS}
        do_scorer = interventional_cb.scorer if interventional_cb is not None else (
            InterventionalScorer() if self.interventional else None)
        do_weights = interventional_cb.weights if interventional_cb is not None else {"do": 0.0, "med": 0.0}

        names = list(pair_sets)
        flat = [pair for name in names for pair in pair_sets[name]]
        members = self._members(pl_module, flat)  # faithful block, then unfaithful: rows r and r + m are one pair
        m = len(flat)
        terms, weights = self._reward_function_terms(pl_module, members)

        results = []
        for network in self.networks:
            scores = self._channels(pl_module, network, coherence, do_scorer, members)
            all_terms, all_weights = dict(terms), dict(weights)
            for c in CHANNELS:
                all_terms[f"coherence_{c}"], all_weights[f"coherence_{c}"] = scores[c], c_weights[c]
            for c in ("do", "med"):
                if c in scores:
                    all_terms[f"coherence_{c}"], all_weights[f"coherence_{c}"] = scores[c], do_weights[c]
            # The run's weights: model.reward_weights overrides a term's own weight, as in training.
            all_weights = {n: float(pl_module.reward_weights.get(n, w)) for n, w in all_weights.items()}
            scores["fused"] = self._fuse(all_terms, all_weights, pl_module.reward_p)
            same = {n: (torch.cat([v[:m], v[:m]]) if n in terms else v) for n, v in all_terms.items()}
            scores["fused_same_accuracy"] = self._fuse(same, all_weights, pl_module.reward_p)
            offset = 0
            for name in names:
                rows = slice(offset, offset + len(pair_sets[name]))
                offset += len(pair_sets[name])
                for channel, values in scores.items():
                    stats = pair_statistics(values[:m][rows], values[m:][rows])
                    results.append({"pairs": name, "network": network, "channel": channel, **stats})
        self._log(pl_module, stage, results)
        self.last_results = results
        self._report(stage, results, Path(pl_module.run_dir()) if hasattr(pl_module, "run_dir") else None,
                     int(getattr(pl_module, "rollout_step", 0)), time.perf_counter() - start)
        return results

    @staticmethod
    def _members(pl_module, pairs) -> Rollout:
        """Both members of every pair as one rollout (no tokens): the faithful members, then the unfaithful
        ones, each (rationale, answer) parsed as a completion that marks its answer as the prompt asks."""
        prompts = pl_module.render_prompts([pair.example for pair in pairs])
        marker = pl_module.prompt.marker
        rows = []
        for side in ("faithful", "unfaithful"):
            for pair, prompt in zip(pairs, prompts):
                rationale, answer = getattr(pair, side)
                rows.append((pair.example, prompt, pl_module.parser(f"{rationale} {_marked(answer, marker)}")))
        n = len(rows)
        empty = torch.zeros((n, 0), dtype=torch.long)
        return Rollout(
            examples=[ex for ex, _, _ in rows], prompts=[p for _, p, _ in rows],
            completions=[f"{q.rationale} {q.answer}" for _, _, q in rows],
            rationales=[q.rationale for _, _, q in rows], answers=[q.answer for _, _, q in rows],
            marker_found=torch.tensor([q.marker_found for _, _, q in rows], dtype=torch.bool), group_size=1,
            prompt_ids=empty, prompt_mask=empty, completion_ids=empty, completion_mask=empty,
            truncated=torch.zeros(n, dtype=torch.bool), stage="diagnostics",
        )

    @staticmethod
    def _reward_function_terms(pl_module, members: Rollout) -> tuple[dict[str, Tensor], dict[str, float]]:
        terms, weights = {}, {}
        for fn in pl_module.reward_functions:
            terms[fn.name], weights[fn.name] = fn(members).float(), float(fn.weight)
        return terms, weights

    def _channels(self, pl_module, network: str, coherence: CoherenceScorer, do_scorer: InterventionalScorer | None,
                  members: Rollout) -> dict[str, Tensor]:
        """Every channel of every member on ``network``, by the path the training rewards take."""
        # Both members of a pair draw their counterfactuals as the faithful member would: a channel that does
        # not read the part they differ in then scores them alike, and a difference is the change's alone.
        m = len(members) // 2
        faithful = list(zip(members.prompts[:m], members.rationales[:m], members.answers[:m]))
        result = score_coherence(pl_module, network, coherence, members.examples, members.prompts,
                                 members.rationales, members.answers, self.seed, draw_as=faithful + faithful)
        out = {c: getattr(result, c).float() for c in CHANNELS}
        if do_scorer is not None:
            inter = score_interventional(pl_module, network, do_scorer, members.prompts, members.rationales,
                                         members.answers, self.seed)
            out["do"] = inter.interventional.float()
            if inter.mediation is not None:
                out["med"] = inter.mediation.float()
        return out

    @staticmethod
    def _fuse(terms: dict[str, Tensor], weights: dict[str, float], p: float) -> Tensor:
        """The training fusion; all-zero weights (nothing optimised) report zeros instead of failing."""
        if sum(weights.values()) <= 0:
            return torch.zeros(next(iter(terms.values())).shape[0])
        return fuse_terms(terms, weights, p).float()

    def _log(self, pl_module, stage: str, results: list[dict]) -> None:
        for r in results:
            base = f"{stage}/diagnostics/{r['pairs']}/{r['network']}/{r['channel']}"
            for key in ("auc", "mean_diff"):
                pl_module.log(f"{base}/{key}", r[key], sync_dist=False, add_dataloader_idx=False)

    @rank_zero_only
    def _report(self, stage: str, results: list[dict], run_dir: Path | None, step: int, seconds: float) -> None:
        rank_zero_info(format_diagnostics(stage, results, step) + f"\n({seconds:.1f} s)")
        if run_dir is None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        with (run_dir / f"{stage}_diagnostics.jsonl").open("a") as handle:
            for r in results:
                handle.write(json.dumps({"stage": stage, "rollout_step": step, **r}) + "\n")
