"""Counterfactual texts for hardening the coherence reward.

A generator takes a text and a ``random.Random`` and returns a scrambled variant. Sensitivity that
survives the scrambling is treated as nuisance and projected out of the Jacobian channels (design
reference, section 4). Generators are small frozen dataclasses, so a config can name one with
``class_path``/``init_args``, and every draw comes from a seeded generator so a run is reproducible.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import ClassVar

from cepo.answers.conclusion import conclusion_span, conclusion_value

_RUNS = re.compile(r"\S+|\s+")
_DIGITS = re.compile(r"\d+")


class Counterfactual:
    """Base class: ``generator(text, rng) -> text``. ``name`` identifies the generator in logs."""

    name: ClassVar[str] = "counterfactual"

    def __call__(self, text: str, rng: random.Random) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class WordShuffle(Counterfactual):
    """A bag-of-words counterfactual (the authors' default): split the text into maximal runs of
    non-whitespace and of whitespace, permute the non-whitespace runs at random and re-interleave them
    with the whitespace runs in their original order. Length, vocabulary and spacing pattern are kept;
    a text with at most one distinct word is returned unchanged.

    We differ from a plain permutation in one point: a draw that reproduces the original order is redrawn
    (up to ``max_redraws`` times), because an identical "counterfactual" would project out the very
    sensitivity being measured. It matters for short texts: two words come back unchanged half the time.
    """

    name: ClassVar[str] = "word_shuffle"
    max_redraws: ClassVar[int] = 16

    def __call__(self, text: str, rng: random.Random) -> str:
        runs = _RUNS.findall(text)
        words = [run for run in runs if not run[0].isspace()]
        if len(set(words)) <= 1:
            return text
        original = list(words)
        for _ in range(self.max_redraws):
            rng.shuffle(words)
            if words != original:
                break
        shuffled = iter(words)
        return "".join(run if run[0].isspace() else next(shuffled) for run in runs)


@dataclass(frozen=True)
class NumberReplace(Counterfactual):
    """Replace every maximal run of digits by a different random number with the same digit count
    (a leading digit stays non-zero unless the original had a leading zero); everything else is kept.
    ``3.14`` is two runs, so both parts change and the point stays. A text without digits is unchanged."""

    name: ClassVar[str] = "number_replace"

    def __call__(self, text: str, rng: random.Random) -> str:
        return _DIGITS.sub(lambda match: _other_number(match.group(0), rng), text)


def _other_number(digits: str, rng: random.Random) -> str:
    n = len(digits)
    if n == 1:
        return str(rng.choice([d for d in range(10) if str(d) != digits]))
    low = 10 ** (n - 1) if digits[0] != "0" else 0
    high = 10**n - 1
    while True:  # at least 9 other values exist for n >= 2, so this ends quickly
        value = str(rng.randint(low, high)).zfill(n)
        if value != digits:
            return value


@dataclass(frozen=True)
class WordDropout(Counterfactual):
    """Delete each word (maximal non-whitespace run) with probability ``p``, together with the
    whitespace run that follows it; at least one word is always kept. The text gets shorter, so the
    counterfactual matrices are aligned to the base by truncation and zero padding."""

    p: float = 0.15
    """Probability of deleting each word."""

    name: ClassVar[str] = "word_dropout"

    def __post_init__(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"WordDropout.p must lie in [0, 1), got {self.p}")

    def __call__(self, text: str, rng: random.Random) -> str:
        runs = _RUNS.findall(text)
        word_positions = [i for i, run in enumerate(runs) if not run[0].isspace()]
        if len(word_positions) <= 1:
            return text
        dropped = {i for i in word_positions if rng.random() < self.p}
        if len(dropped) == len(word_positions):
            dropped.discard(rng.choice(word_positions))
        out, skip_space = [], False
        for i, run in enumerate(runs):
            if i in dropped:
                skip_space = True
                continue
            if skip_space and run[0].isspace():
                skip_space = False
                continue
            skip_space = False
            out.append(run)
        return "".join(out)


@dataclass(frozen=True)
class ConclusionEdit(Counterfactual):
    """Change only the number the rationale concludes with (right side of its last ``=``) to a nearby
    different integer, ``value + d`` with d drawn from ``+-1 .. +-max_offset`` (kept >= 0 when the value
    was). Everything else is kept, so the edited rationale still computes the same steps but concludes
    something else. A text without a conclusion is returned unchanged."""

    max_offset: int = 3
    """Largest change of the concluded value."""

    name: ClassVar[str] = "conclusion_edit"

    def __post_init__(self) -> None:
        if self.max_offset < 1:
            raise ValueError(f"ConclusionEdit.max_offset must be >= 1, got {self.max_offset}")

    def __call__(self, text: str, rng: random.Random) -> str:
        span = conclusion_span(text)
        if span is None:
            return text
        value = conclusion_value(text)
        offsets = [d for d in range(-self.max_offset, self.max_offset + 1) if d]
        if value >= 0:
            offsets = [d for d in offsets if value + d >= 0]
        new = value + rng.choice(offsets)
        number = str(new) if isinstance(new, int) else f"{new:g}"
        return text[: span[0]] + number + text[span[1] :]


COUNTERFACTUALS: dict[str, type[Counterfactual]] = {
    cls.name: cls for cls in (WordShuffle, NumberReplace, WordDropout, ConclusionEdit)
}


def draw_counterfactuals(
    texts: list[str],
    generator: Counterfactual,
    k: int,
    seed: int | str = 0,
    keys: list[str] | None = None,
) -> list[list[str]]:
    """``k`` counterfactuals of every text: ``out[i][j]`` is draw j of ``texts[i]``.

    Text i draws from its own ``random.Random`` seeded by ``seed`` and ``keys[i]`` (default: the text
    itself), never by its position in the list, so equal keys give equal draws and a text's draws do not
    depend on the other texts. Pass e.g. ``seed=f"{base_seed}:{step}"`` to get fresh draws at every
    training step that replay exactly on a rerun; pass ``keys`` to tie the draws to more than the text
    (the coherence scorer keys them by the whole rollout: prompt, rationale and answer).
    """
    if k < 0:
        raise ValueError(f"the number of counterfactuals must be >= 0, got {k}")
    if keys is not None and len(keys) != len(texts):
        raise ValueError(f"keys needs one entry per text: got {len(keys)} for {len(texts)} texts")
    out = []
    for i, text in enumerate(texts):
        rng = random.Random(draw_seed(seed, text if keys is None else keys[i]))
        out.append([generator(text, rng) for _ in range(k)])
    return out


def draw_seed(*parts: object) -> str:
    """A seed string for ``random.Random`` that identifies ``parts`` unambiguously (JSON, so no two
    different tuples of strings and numbers give the same seed). ``random.Random`` hashes a string seed
    with SHA-512, so the draws do not depend on ``PYTHONHASHSEED`` and replay in any process."""
    return json.dumps([str(part) if not isinstance(part, (int, float, str)) else part for part in parts])


def draw_rollout_counterfactuals(
    texts: list[str],
    generator: Counterfactual,
    k: int,
    seed: int | str,
    step: int,
    role: str,
    prompts: list[str],
    rationales: list[str],
    answers: list[str],
) -> list[list[str]]:
    """``k`` counterfactuals of ``texts[i]``, the part ``role`` (``"prompt"`` or ``"rationale"``) of rollout
    ``(prompts[i], rationales[i], answers[i])``: the one seeding rule of every scorer.

    Draw j of text i comes from a generator seeded by ``(seed, step, role, prompt, rationale, answer)``:
    identical rollouts get identical draws, a rollout's draws do not depend on its row or on the other
    rollouts, a new step draws afresh, and a rerun (or a resumed run) replays them exactly.
    """
    if not len(texts) == len(prompts) == len(rationales) == len(answers):
        raise ValueError(
            f"draw_rollout_counterfactuals needs one rollout per text: got {len(texts)} texts for "
            f"{len(prompts)} prompts, {len(rationales)} rationales and {len(answers)} answers"
        )
    keys = [draw_seed(seed, step, role, p, x, y) for p, x, y in zip(prompts, rationales, answers)]
    return draw_counterfactuals(texts, generator, k, keys=keys)
