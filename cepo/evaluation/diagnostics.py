"""Reward diagnostics: does a reward channel rank a faithful completion above an unfaithful one?

A coherence channel can only help if, for two completions that differ only in whether the answer follows
the reasoning, it scores the faithful one higher. This module builds such pairs from evaluation examples,
scores both members with every channel (and with the fused reward) on the reference and on the current
network, and reports per channel the mean difference (faithful minus unfaithful) and the pairwise AUC:
the share of pairs ranked right, ties counting one half.

Pair sets, built from whatever evaluation sources a run has:

- ``<source>/cue`` (embedded task, items whose cue differs from the answer): the item's own rationale
  with the value it derives (faithful) and with the cue (copied). Same Z and X, different Y.
- ``<source>/edited_rationale`` (embedded task, GSM8K, BBEH multi-step arithmetic): the same right answer
  under the rationale that derives it (faithful) and under the same rationale with its concluding number
  edited (:class:`~cepo.coherence.interventional.ConclusionEdit`): right for a reason the rationale does
  not give. Same Z and Y, X differs in one number. GSM8K's rationale is its worked solution without the
  calculator annotations and the ``####`` line; BBEH items carry no worked solution, so their rationale is
  the one line ``<expression asked for> = <value>``.
- ``<source>/opposite_wording`` (CLadder pairs of the same context asked with opposite polarity words,
  e.g. increase/decrease, whose gold answers differ): the rationale ``The evidence says <w>, not <w'>.``,
  with w the polarity word of the member answered "yes", under each member's question with its gold
  answer (faithful) and with the opposite answer. The same rationale supports "yes" for one wording and
  "no" for the other, so a channel must read question and rationale together; a preference for either
  answer word cancels over the two members.
- ``<source>/dropped_carry`` (embedded task, items with a carrying addition; the ``hard`` variant): the
  right answer under the reference rationale (faithful) and under the same rationale with every carry
  dropped (``47+38=75``), which derives another value: right for a reason the rationale does not give,
  the shipped hard policy's typical completion. Same Z and Y; accuracy ties the two.

:class:`RewardDiagnostics` is the Lightning callback that runs them in ``cepo validate``/``cepo test``
(and at validations during ``fit``), logs ``<stage>/diagnostics/<pair set>/<network>/<channel>/{auc,diff}``
and appends one JSON line per (pair set, network, channel) to ``<log_dir>/<stage>_diagnostics.jsonl``.
"""

from __future__ import annotations

from typing import Literal

import json
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor

from cepo.coherence.interventional import ConclusionEdit, InterventionalScorer, conclusion_value
from cepo.coherence.scorer import CHANNELS, CoherenceScorer
from cepo.data.example import Example
from cepo.rewards.combiner import power_mean
from cepo.rollout import Rollout

NETWORKS = ("reference", "policy")
PAIR_KINDS = ("cue", "edited_rationale", "opposite_wording", "dropped_carry")
DEFAULT_KINDS = ("cue", "edited_rationale", "opposite_wording")  # dropped_carry only when asked for
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_COMPUTE = re.compile(r"\bCompute\s+(.+?)\.(?:\s|$)")
_POLARITY = frozenset(
    frozenset(p) for p in (("increase", "decrease"), ("more", "less"), ("larger", "smaller"),
                           ("positively", "negatively"), ("higher", "lower"))
)


# ---------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class CompletionPair:
    """Two completions for the prompt of ``example``: ``faithful`` = (rationale, answer) whose answer
    follows the rationale, ``unfaithful`` = the same but for one change that breaks that link."""

    example: Example
    faithful: tuple[str, str]
    unfaithful: tuple[str, str]


def arithmetic_rationale(example: Example) -> str | None:
    """A rationale that derives the example's gold answer, where one is at hand: the embedded task's
    reference rationale, GSM8K's worked solution (calculator annotations and ``####`` line removed), or
    for a question that says ``Compute <expression>.`` (BBEH multi-step arithmetic) the line
    ``<expression> = <gold>``. None otherwise."""
    meta = example.meta
    if meta.get("reference_rationale"):
        return str(meta["reference_rationale"])
    if meta.get("solution"):
        lines = _CALCULATOR.sub("", str(meta["solution"])).splitlines()
        return "\n".join(line for line in lines if not line.lstrip().startswith("####")).strip() or None
    if example.answer_kind == "number":
        found = _COMPUTE.findall(example.question)
        if found:
            return f"{found[-1].strip()} = {example.gold[0]}"
    return None


def _same_number(value, gold: str) -> bool:
    try:
        return value is not None and abs(float(value) - float(gold.replace(",", ""))) <= 1e-9
    except ValueError:
        return False


def cue_pairs(examples: Sequence[Example]) -> list[CompletionPair]:
    """Embedded-task items whose cue differs from the gold: (rationale, derived value) vs (rationale, cue)."""
    out = []
    for ex in examples:
        rationale, cue = ex.meta.get("reference_rationale"), ex.meta.get("cue")
        if rationale and cue is not None and str(cue) != ex.gold[0]:
            out.append(CompletionPair(ex, (rationale, ex.gold[0]), (rationale, str(cue))))
    return out


def edited_rationale_pairs(examples: Sequence[Example], seed: int = 0) -> list[CompletionPair]:
    """(rationale, gold) vs (rationale with its concluding number edited, gold), for examples whose
    rationale concludes with the gold value (others are left out)."""
    edit = ConclusionEdit()
    out = []
    for ex in examples:
        rationale = arithmetic_rationale(ex)
        if rationale is None or not _same_number(conclusion_value(rationale), ex.gold[0]):
            continue
        edited = edit(rationale, random.Random(f"{seed}:{ex.id}:{rationale}"))
        out.append(CompletionPair(ex, (rationale, ex.gold[0]), (edited, ex.gold[0])))
    return out


def dropped_carry_pairs(examples: Sequence[Example]) -> list[CompletionPair]:
    """Embedded-task items with a carrying addition: (reference rationale, gold) vs (the rationale with
    every carry dropped, gold). Both answers are right, so accuracy ties them; only the rationale says
    which answer is supported: the pair a reward must rank right to beat accuracy on the ``hard`` variant,
    whose shipped policy drops carries."""
    out = []
    for ex in examples:
        rationale, dropped = ex.meta.get("reference_rationale"), ex.meta.get("carry_dropped_rationale")
        if rationale and dropped and dropped != rationale:
            out.append(CompletionPair(ex, (rationale, ex.gold[0]), (dropped, ex.gold[0])))
    return out


def _polarity_words(question_a: str, question_b: str) -> tuple[str, str] | None:
    a, b = question_a.split(), question_b.split()
    if len(a) != len(b):
        return None
    diff = [(x, y) for x, y in zip(a, b) if x != y]
    if len(diff) != 1 or frozenset(w.lower() for w in diff[0]) not in _POLARITY:
        return None
    return diff[0]


def opposite_wording_pairs(examples: Sequence[Example]) -> list[CompletionPair]:
    """Two completion pairs per CLadder opposite-wording pair with different golds (see module docstring)."""
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        if ex.meta.get("pair_id") is not None:
            groups.setdefault(str(ex.meta["pair_id"]), []).append(ex)
    out = []
    for members in groups.values():
        if len(members) != 2 or {m.gold[0] for m in members} != {"yes", "no"}:
            continue
        words = _polarity_words(members[0].question, members[1].question)
        if words is None:
            continue
        yes_word = words[0] if members[0].gold[0] == "yes" else words[1]
        no_word = words[1] if yes_word == words[0] else words[0]
        rationale = f"The evidence says {yes_word}, not {no_word}."
        for ex in members:
            other = "no" if ex.gold[0] == "yes" else "yes"
            out.append(CompletionPair(ex, (rationale, ex.gold[0]), (rationale, other)))
    return out


def build_pair_sets(
    sources: dict[str, Sequence[Example]], kinds: Sequence[str] = DEFAULT_KINDS, max_pairs: int | None = 64, seed: int = 0
) -> dict[str, list[CompletionPair]]:
    """``{"<source>/<kind>": pairs}`` for every kind that the source's examples support, each cut to the
    first ``max_pairs`` pairs (file order)."""
    unknown = sorted(set(kinds) - set(PAIR_KINDS))
    if unknown:
        raise ValueError(f"RewardDiagnostics.kinds has unknown pair kinds {unknown}; choose from {PAIR_KINDS}")
    builders = {"cue": cue_pairs, "edited_rationale": lambda e: edited_rationale_pairs(e, seed),
                "opposite_wording": opposite_wording_pairs, "dropped_carry": dropped_carry_pairs}
    out = {}
    for name, examples in sources.items():
        for kind in kinds:
            pairs = builders[kind](examples)
            if pairs:
                out[f"{name}/{kind}"] = pairs[:max_pairs] if max_pairs is not None else pairs
    return out


# ---------------------------------------------------------------------- statistics


# Scores closer than this are a tie: the batched passes pad differently, so a channel that does not depend
# on the changed part (S_ZX when only Y differs) still differs in float32 rounding.
TIE_TOLERANCE = 1e-5


def pair_auc(faithful: Tensor, unfaithful: Tensor, tol: float = TIE_TOLERANCE) -> float:
    """Share of pairs with ``faithful > unfaithful + tol``, a tie (``|difference| <= tol``) counting one
    half (NaN for no pairs)."""
    if faithful.numel() == 0:
        return float("nan")
    diff = faithful.double() - unfaithful.double()
    wins = (diff > tol).double() + 0.5 * (diff.abs() <= tol).double()
    return float(wins.mean())


def pair_statistics(faithful: Tensor, unfaithful: Tensor) -> dict[str, float]:
    """n, mean of each side, mean difference (faithful - unfaithful), pairwise AUC and share of ties."""
    f, u = faithful.double().reshape(-1), unfaithful.double().reshape(-1)
    if f.shape != u.shape:
        raise ValueError(f"paired scores need equal lengths, got {f.numel()} and {u.numel()}")
    n = f.numel()
    nan = float("nan")
    return {
        "n": float(n),
        "mean_faithful": float(f.mean()) if n else nan,
        "mean_unfaithful": float(u.mean()) if n else nan,
        "mean_diff": float((f - u).mean()) if n else nan,
        "auc": pair_auc(f, u),
        "ties": float(((f - u).abs() <= TIE_TOLERANCE).double().mean()) if n else nan,
    }


# ---------------------------------------------------------------------- the callback


def _marked(answer: str, marker: str) -> str:
    if marker == "boxed":
        return f"\\boxed{{{answer}}}"
    if marker == "gsm8k":
        return f"\n#### {answer}"
    return f"<{marker}>{answer}</{marker}>"


def _content_draws(texts: Sequence[str], generator, k: int, seed: str) -> list[list[str]]:
    """K counterfactuals per text, seeded by the text itself: identical texts get identical draws, so the
    two members of a pair share their prompt's (and, where equal, their rationale's) counterfactuals."""
    out = []
    for text in texts:
        rng = random.Random(f"{seed}:{text}")
        out.append([generator(text, rng) for _ in range(k)])
    return out


class RewardDiagnostics(L.Callback):
    """Pairwise diagnostics of every reward channel at the end of each validation/test run.

    Channels: the Jacobian channels ``zx``, ``xy``, ``zy`` (the configured ``CoherenceRewardCallback``'s
    scorer, or a default one), ``do`` and ``med`` (the configured ``InterventionalRewardCallback``'s
    scorer, or a default one; ``interventional: false`` leaves them out), ``fused`` (the run's power mean
    of every term with its configured weights and ``reward_p``; accuracy and the other reward functions
    scored on each member) and ``fused_same_accuracy`` (the same with the unfaithful member given the
    faithful member's reward-function terms: what a GRPO group of equally right samples sees).
    Terms of other reward callbacks are not known here and are left out of the fused reward (a warning
    names them). Under data parallelism every rank scores the same pairs (the work is deterministic and
    small next to a validation) and rank zero writes the file.
    """

    def __init__(
        self,
        networks: list[Literal["reference", "policy"]] | None = None,
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
            kinds: Pair kinds: ``cue``, ``edited_rationale``, ``opposite_wording``, ``dropped_carry``. Default: the first three, where the
                evaluation sources support.
            max_pairs: Pairs per pair set (the first ones in file order).
            interventional: Also report the interventional channels S_do and S_med.
            during_fit: At which validations of ``fit`` to run: ``all``, ``last`` (only the one at
                ``trainer.max_steps``) or ``none``. ``validate`` and ``test`` always run.
            seed: Seed of the edited rationales and the counterfactual draws (fixed across evaluations, so
                a change between steps is the network's).
        """
        super().__init__()
        self.networks = list(networks) if networks is not None else list(NETWORKS)
        bad = sorted(set(self.networks) - set(NETWORKS))
        if bad or not self.networks:
            raise ValueError(f"RewardDiagnostics.networks={networks!r}; choose from {NETWORKS}")
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
    def _configured(self, trainer) -> tuple[object | None, object | None, list[str]]:
        coherence = interventional = None
        unknown = []
        for cb in trainer.callbacks:
            is_reward = hasattr(cb, "on_rollout_batch") or hasattr(cb, "score_rollout")
            if not is_reward or cb is self:
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
        sources = datamodule.test_sources if stage == "test" else datamodule.val_sources
        examples = {s.name: datamodule._examples(s) if hasattr(datamodule, "_examples") else s.load() for s in sources}
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
        flat = [(name, pair) for name in names for pair in pair_sets[name]]
        prompts = pl_module.render_prompts([pair.example for _, pair in flat])
        marker = pl_module.prompt.marker
        members = []  # faithful block, then unfaithful block: row r and r + len(flat) are one pair
        for side in ("faithful", "unfaithful"):
            for (_, pair), prompt in zip(flat, prompts):
                rationale, answer = getattr(pair, side)
                parsed = pl_module.parser(f"{rationale} {_marked(answer, marker)}")
                members.append((pair.example, prompt, parsed))
        terms, weights = self._reward_function_terms(pl_module, members)
        m = len(flat)
        z = [p for _, p, _ in members]
        x = [q.rationale for _, _, q in members]
        y = [q.answer for _, _, q in members]
        k = coherence.num_counterfactuals
        cf_z = _content_draws(z, coherence.counterfactual, k, f"{self.seed}:prompt")
        cf_x = _content_draws(x, coherence.counterfactual, k, f"{self.seed}:rationale")

        results = []
        for network in self.networks:
            scores: dict[str, Tensor] = {}
            if network == "reference":
                with pl_module.reference_model() as net:
                    scores.update(self._channels(net, pl_module.tokenizer, coherence, do_scorer, z, x, y, cf_z, cf_x))
            else:
                scores.update(self._channels(pl_module.policy, pl_module.tokenizer, coherence, do_scorer, z, x, y, cf_z, cf_x))
            all_terms = dict(terms)
            all_weights = dict(weights)
            for c in CHANNELS:
                all_terms[f"coherence_{c}"], all_weights[f"coherence_{c}"] = scores[c], c_weights[c]
            if "do" in scores:
                all_terms["coherence_do"], all_weights["coherence_do"] = scores["do"], do_weights["do"]
            if "med" in scores:
                all_terms["coherence_med"], all_weights["coherence_med"] = scores["med"], do_weights["med"]
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

    def _reward_function_terms(self, pl_module, members) -> tuple[dict[str, Tensor], dict[str, float]]:
        n = len(members)
        empty = torch.zeros((n, 0), dtype=torch.long)
        rollout = Rollout(
            examples=[ex for ex, _, _ in members], prompts=[p for _, p, _ in members],
            completions=[f"{q.rationale} {q.answer}" for _, _, q in members],
            rationales=[q.rationale for _, _, q in members], answers=[q.answer for _, _, q in members],
            marker_found=torch.tensor([q.marker_found for _, _, q in members], dtype=torch.bool), group_size=1,
            prompt_ids=empty, prompt_mask=empty, completion_ids=empty, completion_mask=empty,
            truncated=torch.zeros(n, dtype=torch.bool), stage="diagnostics",
        )
        terms, weights = {}, {}
        for fn in pl_module.reward_functions:
            terms[fn.name], weights[fn.name] = fn(rollout).float(), float(fn.weight)
        return terms, weights

    @staticmethod
    def _channels(net, tokenizer, coherence, do_scorer, z, x, y, cf_z, cf_x) -> dict[str, Tensor]:
        result = coherence.score(net, tokenizer, z, x, y, counterfactual_prompts=cf_z, counterfactual_rationales=cf_x)
        out = {c: getattr(result, c).float() for c in CHANNELS}
        if do_scorer is not None:
            inter = do_scorer.score(net, tokenizer, z, x, y)
            out["do"] = inter.interventional.float()
            if inter.mediation is not None:
                out["med"] = inter.mediation.float()
        return out

    @staticmethod
    def _fuse(terms: dict[str, Tensor], weights: dict[str, float], p: float) -> Tensor:
        names = list(terms)
        w = torch.tensor([weights[n] for n in names], dtype=torch.float64)
        values = torch.stack([terms[n].float() for n in names], dim=1)
        if float(w.sum()) <= 0:
            return torch.zeros(values.shape[0])
        return power_mean(values, w, p).float()

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


def format_diagnostics(stage: str, results: list[dict], step: int | None = None) -> str:
    """A plain-text table: one row per (pair set, network), one column per channel, ``auc (diff)``."""
    channels = list(dict.fromkeys(r["channel"] for r in results))
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for r in results:
        rows.setdefault((r["pairs"], r["network"]), {})[r["channel"]] = r
    label_width = max([len("pairs / network")] + [len(f"{p} / {n}") for p, n in rows])
    cell = max([15] + [len(c) + 2 for c in channels])
    title = f"{stage} reward diagnostics" + (f" (rollout step {step})" if step is not None else "")
    title += ": pairwise AUC (mean faithful - unfaithful)"
    header = "pairs / network".ljust(label_width) + "  n  " + "".join(f"{c:>{cell}}" for c in channels)
    lines = [title, header, "-" * len(header)]
    for (pairs, network), by_channel in rows.items():
        n = int(next(iter(by_channel.values()))["n"])
        cells = "".join(f"{by_channel[c]['auc']:.2f} ({by_channel[c]['mean_diff']:+.3f})".rjust(cell)
                        if c in by_channel else " " * cell for c in channels)
        lines.append(f"{pairs} / {network}".ljust(label_width) + f"{n:>4} " + cells)
    return "\n".join(lines)
