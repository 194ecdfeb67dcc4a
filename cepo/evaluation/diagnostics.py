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
  edited (:class:`~cepo.coherence.counterfactuals.ConclusionEdit`): right for a reason the rationale does
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

This module is pure: pairs from examples, statistics from scores, a table from statistics. The Lightning
callback that scores the pairs on the networks in ``cepo validate``/``cepo test`` (and at validations
during ``fit``) is :class:`cepo.training.diagnostics_callback.RewardDiagnostics`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from cepo.answers.conclusion import conclusion_value
from cepo.coherence.counterfactuals import ConclusionEdit
from cepo.records import Example

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
