"""The coherence reward: Jacobian channel scores of (prompt Z, rationale X, answer Y) triples.

For every rollout the scorer builds ``1 + 2K`` sequences ``[Z] <eos> [X] <eos> [Y]`` (the base, K
shuffled prompts and K shuffled rationales), runs them through the model in padded micro-batches with one
forward and two vector-Jacobian products per micro-batch (the shuffled rationales run only their suffix
``[X~] <eos> [Y]`` after a cached prompt prefix, with one VJP), and turns the gradients of the segment
log-likelihoods with respect to the input embeddings into three channel scores ``S_ZX``, ``S_XY`` and
``S_ZY`` (direct) in [floor, 1]. The arithmetic is in :mod:`cepo.coherence.math`; the design notes give the
formulas (docs/design.md#jacobians and docs/design.md#counterfactuals).
"""

from __future__ import annotations

from typing import Literal

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cepo.coherence import math as cm
from cepo.coherence.counterfactuals import Counterfactual, WordShuffle, draw_rollout_counterfactuals
from cepo.policy.cache import PrefixCache
from cepo.policy.forward import autocast_off, backbone_and_head, position_ids_from_mask
from cepo.policy.logprobs import token_logprobs
from cepo.policy.passes import (
    checkpointed_layers,
    embedding_leaf,
    free_memory,
    is_out_of_memory,
    position_limit,
    right_padded,
    scoring_mode,
    unwrap_ddp,
)

CHANNELS = ("zx", "xy", "zy")
AUTO_START = 256  # micro_batch_size="auto" starts here and halves on out-of-memory

logger = logging.getLogger(__name__)

# Kinds of sequence a rollout contributes.
_BASE, _PROMPT_CF, _RATIONALE_CF = 0, 1, 2


@dataclass
class CoherenceResult:
    """Channel scores per rollout, as ``(N,)`` float32 CPU tensors in [floor, 1].

    ``zx``: S_ZX, the rationale's dependence on the prompt; ``xy``: S_XY, the answer's dependence on the
    rationale; ``zy``: S_ZY, the answer's direct dependence on the prompt (the part not carried through
    the rationale). ``diagnostics`` maps names to ``(N,)`` tensors: ``{c}_shape`` and ``{c}_magnitude``
    (the two factors of each score), ``{c}_norm`` (the Frobenius norm of the base matrix ``J_c``) and
    ``zy_total_norm`` (``||J_ZYtot||`` before the direct-effect projection), and per-row flags (1.0 or
    0.0; their logged means are fractions of the batch): ``duplicate`` (the same texts as an earlier
    row, whose scores it shares: scored once), ``skipped_nonfinite`` (an inf or NaN in its Jacobians:
    scored at the floor), ``truncated`` (cut to fit the model's positions), ``capped`` (cut by
    ``max_prompt_tokens``, ``max_rationale_tokens`` or ``max_answer_tokens``: its scores describe the kept
    tokens only) and ``content_not_found`` (its prompt content was not in its prompt: the whole prompt was
    shuffled).
    """

    zx: Tensor
    xy: Tensor
    zy: Tensor
    diagnostics: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class _Sequence:
    rollout: int
    kind: int
    k: int
    z: list[int]
    x: list[int]
    y: list[int]
    truncated: bool = False  # cut to fit the model's positions
    capped: bool = False  # cut by a user-set token cap

    def __len__(self) -> int:
        return len(self.z) + len(self.x) + len(self.y) + 2


@dataclass
class _Slices:
    """Gradient rows kept from one rollout's sequences, each ``(rows, d)``."""

    zx: Tensor | None = None
    zy_total: Tensor | None = None
    xy: Tensor | None = None
    zx_cf: dict[int, Tensor] = field(default_factory=dict)
    zy_total_cf: dict[int, Tensor] = field(default_factory=dict)
    xy_cf: dict[int, Tensor] = field(default_factory=dict)

    def matrices(self) -> dict[str, Tensor]:
        """Every matrix by a name that says which channel and sequence it came from."""
        out = {"J_ZX (base)": self.zx, "J_ZYtot (base)": self.zy_total, "J_XY (base)": self.xy}
        for k in sorted(self.zx_cf):
            out[f"J_ZX (shuffled prompt {k})"] = self.zx_cf[k]
            out[f"J_ZYtot (shuffled prompt {k})"] = self.zy_total_cf[k]
        for k in sorted(self.xy_cf):
            out[f"J_XY (shuffled rationale {k})"] = self.xy_cf[k]
        return out

    def nonfinite(self) -> list[str]:
        """Names of the matrices that hold an inf or NaN."""
        return [name for name, J in self.matrices().items() if J is not None and not bool(torch.isfinite(J).all())]

    def zero(self) -> None:
        """Replace every matrix by zeros of its shape (a skipped rollout still runs through the batched
        arithmetic, whose result is then overwritten with the floor)."""
        for store in (self.zx_cf, self.zy_total_cf, self.xy_cf):
            for k in store:
                store[k] = torch.zeros_like(store[k])
        self.zx, self.zy_total, self.xy = (torch.zeros_like(J) for J in (self.zx, self.zy_total, self.xy))


class CoherenceScorer:
    """Scores the causal coherence of rollouts from input-embedding gradients (CE-PO, arXiv 2509.23095).

    The pass runs with autocast off, in eval mode (no dropout) and without gradient checkpointing, in
    the scoring network's own dtype: a float32 network gives float32 gradients; a half-precision one is
    scored in half precision and its gradients are upcast for the arithmetic.

    Per rollout, the base ``[Z] <eos> [X] <eos> [Y]`` and the K shuffled prompts run with one forward and
    two vector-Jacobian products; the K shuffled rationales need only G_Y at their X~ rows, so they share
    one cached, gradient-free pass over the rollout's prompt prefix ``[Z] <eos>`` and run only the suffix
    ``[X~] <eos> [Y]``. Models with sliding-window attention run full sequences instead.

    A rollout's scores are a function of its texts and the step (the counterfactual draws are seeded by
    them), so each distinct (prompt, rationale, answer) is scored once per call and the scores are
    copied to its duplicates: late in training many of a group's G completions are identical.
    """

    def __init__(
        self,
        micro_batch_size: int | str = 16,
        num_counterfactuals: int = 4,
        counterfactual: Counterfactual = WordShuffle(),
        max_prompt_tokens: int | None = None,
        max_rationale_tokens: int | None = None,
        max_answer_tokens: int | None = None,
        floor: float = 0.005,
        hardened: bool = True,
        seed: int = 0,
        context_overflow: Literal["truncate", "error"] = "truncate",
        activation_checkpointing: bool = False,
    ) -> None:
        """
        Args:
            micro_batch_size: Sequences per forward/backward pass, and rollouts whose gradients are held at
                once; ``"auto"``: start at 256 and halve on out-of-memory until a pass fits (the size found
                is kept for later calls).
            num_counterfactuals: K, draws per prompt and per rationale (authors: 4 up to 4B, 1 for 8B); 0: none.
            counterfactual: Generator of the counterfactual texts (default: the authors' word shuffle).
            max_prompt_tokens: Keep at most this many prompt tokens, the last ones (None: no cap).
            max_rationale_tokens: Keep at most this many rationale tokens, the last ones (None: no cap).
            max_answer_tokens: Keep at most this many answer tokens, the first ones (None: no cap).
            floor: Lowest score f: a channel scores ``f + (1 - f) * sqrt(shape * magnitude)``, in [f, 1].
            hardened: False gives the naive variant of the reward-hacking study: no counterfactuals, no magnitude.
            seed: Base seed of the counterfactual draws, which depend on (seed, step, the rollout's texts).
            context_overflow: A sequence ``[Z] <eos> [X] <eos> [Y]`` longer than the model's positions
                (``max_position_embeddings``): ``"truncate"`` cuts it to fit (prompt from the left first, then
                rationale from the left, then answer from the right) and counts it in the ``truncated``
                diagnostic; ``"error"`` refuses it.
            activation_checkpointing: Recompute each decoder layer's activations in the backward passes
                instead of storing them: less memory per sequence, about one more forward per VJP.
                Shuffled rationales then run as full sequences (a checkpointed layer cannot reuse a cache).
        """
        if micro_batch_size != "auto" and not (isinstance(micro_batch_size, int) and micro_batch_size >= 1):
            raise ValueError(f"micro_batch_size must be an integer >= 1 or 'auto', got {micro_batch_size!r}")
        if num_counterfactuals < 0:
            raise ValueError(f"num_counterfactuals must be >= 0, got {num_counterfactuals}")
        for name, cap in (
            ("max_prompt_tokens", max_prompt_tokens),
            ("max_rationale_tokens", max_rationale_tokens),
            ("max_answer_tokens", max_answer_tokens),
        ):
            if cap is not None and cap < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {cap}")
        if not 0.0 <= floor < 1.0:
            raise ValueError(f"floor must lie in [0, 1), got {floor}")
        if context_overflow not in ("truncate", "error"):
            raise ValueError(f"context_overflow must be 'truncate' or 'error', got {context_overflow!r}")
        self.micro_batch_size = micro_batch_size
        self.num_counterfactuals = num_counterfactuals
        self.counterfactual = counterfactual
        self.max_prompt_tokens = max_prompt_tokens
        self.max_rationale_tokens = max_rationale_tokens
        self.max_answer_tokens = max_answer_tokens
        self.floor = floor
        self.hardened = hardened
        self.seed = seed
        self.context_overflow = context_overflow
        self.activation_checkpointing = activation_checkpointing
        self._auto_size = AUTO_START if micro_batch_size == "auto" else int(micro_batch_size)

    # ------------------------------------------------------------------ public entry point

    def score(
        self,
        model: nn.Module,
        tokenizer,
        prompts: Sequence[str],
        rationales: Sequence[str],
        answers: Sequence[str],
        counterfactual_prompts: Sequence[Sequence[str]] | None = None,
        counterfactual_rationales: Sequence[Sequence[str]] | None = None,
        step: int = 0,
        prompt_contents: Sequence[str | None] | None = None,
        draw_as: Sequence[tuple[str, str, str]] | None = None,
    ) -> CoherenceResult:
        """Channel scores of N rollouts ``(prompts[i], rationales[i], answers[i])``.

        The score of a rollout is a function of its texts and ``step`` alone: its counterfactuals are
        drawn with ``self.counterfactual`` from a generator seeded by ``(seed, step, prompt, rationale,
        answer)``, so identical rollouts score identically, and each distinct rollout is scored once and
        its scores are copied to its duplicates (diagnostic ``duplicate``).

        ``prompt_contents[i]``: the part of ``prompts[i]`` that shuffled prompts perturb (e.g. the user's
        question inside a chat template); the text around it (system turn, role headers, instruction
        frame) stays in place. It is located as the last occurrence of its stripped text in the prompt;
        None, an empty string or a content the prompt does not contain (diagnostic
        ``content_not_found``) perturbs the whole prompt. ``counterfactual_prompts[i]`` /
        ``counterfactual_rationales[i]`` (each a list of K = ``num_counterfactuals`` texts; other lengths
        are refused) replace the drawn counterfactuals. The unhardened variant uses no counterfactuals and
        refuses them.

        ``draw_as[i]``: the rollout ``(prompt, rationale, answer)`` whose seeds row i draws with (default:
        its own texts). Rows that name the same rollout draw with the same generators, so two completions
        that differ in one part get the same (or, for texts of the same shape, corresponding) draws of the
        others: the reward diagnostics score each pair's members this way.

        A rollout whose gradients hold an inf or NaN (e.g. a half-precision overflow) is scored at the
        floor on every channel, counted in the ``skipped_nonfinite`` diagnostic and named in a logged
        warning. The model's training mode, gradient checkpointing and ``requires_grad`` flags are left as
        they were, and no parameter ``.grad`` is touched.
        """
        n = len(prompts)
        if len(rationales) != n or len(answers) != n:
            raise ValueError(
                f"prompts, rationales and answers must have one entry per rollout; got {n}, "
                f"{len(rationales)} and {len(answers)}"
            )
        if prompt_contents is not None and len(prompt_contents) != n:
            raise ValueError(f"prompt_contents needs one entry per rollout: got {len(prompt_contents)} for {n}")
        if draw_as is not None and len(draw_as) != n:
            raise ValueError(f"draw_as needs one (prompt, rationale, answer) per rollout: got {len(draw_as)} for {n}")
        if n == 0:
            empty = torch.zeros(0, dtype=torch.float32)
            return CoherenceResult(empty, empty.clone(), empty.clone(), {})
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id: the coherence pass joins Z, X and Y with EOS")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        contents = [None] * n if prompt_contents is None else [c or None for c in prompt_contents]
        if not self.hardened and (counterfactual_prompts is not None or counterfactual_rationales is not None):
            raise ValueError(
                "coherence scorer: counterfactual texts were given, but the unhardened scorer (hardened=false) uses "
                "none; leave them out or set hardened=true"
            )
        k = self.num_counterfactuals
        given_p = _checked_given("counterfactual_prompts", counterfactual_prompts, n, k)
        given_x = _checked_given("counterfactual_rationales", counterfactual_rationales, n, k)

        # Every distinct rollout once: the score depends on nothing but these texts (and the step).
        seeds = [(prompts[i], rationales[i], answers[i]) for i in range(n)] if draw_as is None else [
            tuple(texts) for texts in draw_as]
        keys = [
            (prompts[i], contents[i], rationales[i], answers[i], seeds[i],
             None if given_p is None else tuple(given_p[i]), None if given_x is None else tuple(given_x[i]))
            for i in range(n)
        ]
        first: dict[tuple, int] = {}
        rows: list[int] = []  # the first row of each distinct rollout
        inverse: list[int] = []  # row -> its distinct rollout
        for i, key in enumerate(keys):
            if key not in first:
                first[key] = len(rows)
                rows.append(i)
            inverse.append(first[key])
        u_prompts = [prompts[i] for i in rows]
        u_rationales = [rationales[i] for i in rows]
        u_answers = [answers[i] for i in rows]
        cf_prompts, cf_rationales, not_found = self._counterfactual_texts(
            u_prompts, [contents[i] for i in rows], u_rationales, [seeds[i] for i in rows],
            None if given_p is None else [given_p[i] for i in rows],
            None if given_x is None else [given_x[i] for i in rows],
            step,
        )
        limit = position_limit(model)
        sequences = self._sequences(tokenizer, u_prompts, u_rationales, u_answers, cf_prompts, cf_rationales, limit, rows)
        truncated = {seq.rollout for seq in sequences if seq.truncated}
        capped = {seq.rollout for seq in sequences if seq.capped}
        n_z_cf = len(cf_prompts[0]) if cf_prompts else 0
        n_x_cf = len(cf_rationales[0]) if cf_rationales else 0

        model = unwrap_ddp(model)
        with ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(scoring_mode(model))
            if self.activation_checkpointing:
                stack.enter_context(checkpointed_layers(model))
            per_rollout, nonfinite = self._run(model, sequences, len(rows), eos, pad, n_z_cf, n_x_cf)
        if nonfinite:
            copies = {u: [i for i in range(n) if inverse[i] == u] for u in nonfinite}
            where = "; ".join(
                f"rollout {', '.join(map(str, copies[u]))}: {', '.join(nonfinite[u])}" for u in sorted(nonfinite)
            )
            logger.warning(
                "coherence scorer: non-finite Jacobian entries in %d distinct rollout(s), scored at the floor "
                "(diagnostic coherence/skipped_nonfinite); %s. Half-precision overflow is the usual cause: "
                "score a float32 network.", len(nonfinite), where,
            )
        if truncated:
            logger.warning(
                "coherence scorer: %d distinct rollout(s) had sequences longer than the model's %d positions "
                "and were truncated to fit (diagnostic coherence/truncated); set max_prompt_tokens, "
                "max_rationale_tokens or max_answer_tokens to choose the cut yourself.", len(truncated), limit,
            )

        result = {key: torch.stack([r[key] for r in per_rollout]).float().cpu() for key in per_rollout[0]}
        flags = {"skipped_nonfinite": set(nonfinite), "truncated": truncated, "capped": capped,
                 "content_not_found": not_found}
        for name, marked in flags.items():
            result[name] = torch.tensor([float(u in marked) for u in range(len(rows))])
        index = torch.tensor(inverse, dtype=torch.long)
        result = {key: value[index] for key, value in result.items()}
        result["duplicate"] = torch.tensor([float(rows[inverse[i]] != i) for i in range(n)])
        zx, xy, zy = (result.pop(c) for c in CHANNELS)
        return CoherenceResult(zx=zx, xy=xy, zy=zy, diagnostics=result)

    # ------------------------------------------------------------------ inputs

    def _counterfactual_texts(self, prompts, contents, rationales, seeds, given_prompts, given_rationales, step):
        """``(cf_prompts, cf_rationales, rows whose content was not found)``. Row i's draws are seeded by the
        step and ``seeds[i]``, the (prompt, rationale, answer) it draws as, never by its position in the batch."""
        if not self.hardened:
            return [], [], set()
        k = self.num_counterfactuals
        not_found: set[int] = set()
        seed_z, seed_x, seed_y = ([row[j] for row in seeds] for j in range(3))
        if given_prompts is None:
            spans = [_content_span(p, c) for p, c in zip(prompts, contents)]
            not_found = {i for i, (c, span) in enumerate(zip(contents, spans)) if c is not None and span is None}
            bodies = [p if span is None else p[span[0] : span[1]] for p, span in zip(prompts, spans)]
            drawn = draw_rollout_counterfactuals(bodies, self.counterfactual, k, self.seed, step, "prompt", seed_z,
                                                 seed_x, seed_y)
            given_prompts = [
                row if span is None else [p[: span[0]] + text + p[span[1] :] for text in row]
                for p, span, row in zip(prompts, spans, drawn)
            ]
        if given_rationales is None:
            given_rationales = draw_rollout_counterfactuals(list(rationales), self.counterfactual, k, self.seed, step,
                                                            "rationale", seed_z, seed_x, seed_y)
        return [list(t) for t in given_prompts], [list(t) for t in given_rationales], not_found

    def _sequences(self, tokenizer, prompts, rationales, answers, cf_prompts, cf_rationales, limit=None, rows=None):
        """The ``1 + 2K`` sequences of every rollout, each cut to fit ``limit`` positions where needed
        (flagged ``truncated``). ``rows[i]``: the caller's row of rollout i, for error messages."""
        texts = list(prompts) + list(rationales) + list(answers)
        texts += [t for row in cf_prompts for t in row] + [t for row in cf_rationales for t in row]
        unique = list(dict.fromkeys(texts))
        encoded = tokenizer(unique, add_special_tokens=False)["input_ids"] if unique else []
        ids = dict(zip(unique, encoded))

        def z(text):
            return _keep_last(ids[text], self.max_prompt_tokens)

        def x(text):
            return _keep_last(ids[text], self.max_rationale_tokens)

        def y(text):
            return list(ids[text][: self.max_answer_tokens])

        def was_capped(texts: tuple[str, str, str], kept: tuple[list, list, list]) -> bool:
            return any(len(ids[t]) > len(k) for t, k in zip(texts, kept))

        out = []

        def add(i, kind, k, texts):
            zi, xi, yi = z(texts[0]), x(texts[1]), y(texts[2])
            capped = was_capped(texts, (zi, xi, yi))
            cut = limit is not None and len(zi) + len(xi) + len(yi) + 2 > limit
            if cut:
                if self.context_overflow == "error":
                    row = i if rows is None else rows[i]
                    raise ValueError(
                        f"coherence scorer: rollout {row} needs {len(zi) + len(xi) + len(yi) + 2} positions "
                        f"([Z] <eos> [X] <eos> [Y], counterfactual {kind}:{k}) but the model has {limit}; set "
                        "max_prompt_tokens, max_rationale_tokens or max_answer_tokens, or "
                        "context_overflow='truncate'"
                    )
                zi, xi, yi = _fit(zi, xi, yi, limit)
            out.append(_Sequence(i, kind, k, zi, xi, yi, cut, capped))

        for i in range(len(prompts)):
            base = (prompts[i], rationales[i], answers[i])
            add(i, _BASE, 0, base)
            for k, text in enumerate(cf_prompts[i] if cf_prompts else []):
                add(i, _PROMPT_CF, k, (text, base[1], base[2]))
            for k, text in enumerate(cf_rationales[i] if cf_rationales else []):
                add(i, _RATIONALE_CF, k, (base[0], text, base[2]))
        return out

    # ------------------------------------------------------------------ the gradient pass

    def _run(self, model, sequences, n, eos, pad, n_z_cf, n_x_cf):
        """``(scores per rollout, {rollout: names of its non-finite matrices})``.

        Rollouts are taken longest first, in chunks of at most micro-batch-size rollouts, so that the
        gradients kept in flight stay bounded. With ``micro_batch_size="auto"`` a chunk that runs out of
        memory is retried at half the size."""
        by_rollout: list[list[_Sequence]] = [[] for _ in range(n)]
        for seq in sequences:
            by_rollout[seq.rollout].append(seq)
        order = sorted(range(n), key=lambda i: -len(by_rollout[i][0]))
        results: list[dict[str, Tensor] | None] = [None] * n
        nonfinite: dict[int, list[str]] = {}
        done = 0
        while done < n:
            size = self._auto_size
            chunk = order[done : done + size]
            try:
                scores, bad = self._score_chunk(model, chunk, by_rollout, size, eos, pad, n_z_cf, n_x_cf)
            except Exception as err:  # noqa: BLE001 - only out-of-memory errors are retried
                if self.micro_batch_size != "auto" or size == 1 or not is_out_of_memory(err):
                    raise
                self._auto_size = size // 2
                free_memory(model)
                logger.info("coherence scorer: out of memory at micro-batch %d, retrying at %d", size, size // 2)
                continue
            nonfinite.update(bad)
            for j, i in enumerate(chunk):
                results[i] = {key: value[j] for key, value in scores.items()}
            done += len(chunk)
        return results, nonfinite  # type: ignore[return-value]

    def _score_chunk(self, model, chunk, by_rollout, size, eos, pad, n_z_cf, n_x_cf):
        """Scores of the rollouts in ``chunk``. The base and shuffled-prompt sequences run longest first
        (little padding) with one forward and two VJPs per pass; the shuffled-rationale sequences need
        only G_Y at their X~ rows, so they reuse their rollout's cached prompt prefix and run only the
        X~ <eos> Y suffix, with a single VJP."""
        weight = model.get_input_embeddings().weight
        device, d = weight.device, weight.shape[-1]
        slices = {i: _Slices() for i in chunk}
        both = [seq for i in chunk for seq in by_rollout[i] if seq.kind != _RATIONALE_CF]
        for seq in both:  # no rationale and no answer: nothing to differentiate, every gradient is zero
            if not seq.x and not seq.y:
                zeros = torch.zeros((len(seq), d), dtype=torch.float32, device=device)
                self._keep(slices[seq.rollout], seq, zeros, zeros)
        both = sorted((seq for seq in both if seq.x or seq.y), key=len, reverse=True)
        for start in range(0, len(both), size):
            batch = both[start : start + size]
            G_X, G_Y = self._gradients(model, batch, eos, pad)
            for row, seq in enumerate(batch):
                self._keep(slices[seq.rollout], seq, G_X[row], G_Y[row])
        y_only = [seq for i in chunk for seq in by_rollout[i] if seq.kind == _RATIONALE_CF]
        for seq, rows in zip(y_only, self._rationale_rows(model, y_only, eos, pad, size)):
            slices[seq.rollout].xy_cf[seq.k] = rows
        bad = {}
        for i in chunk:
            names = slices[i].nonfinite()
            if names:
                bad[i] = names
                slices[i].zero()
        scores = self._finalize([slices[i] for i in chunk], n_z_cf, n_x_cf)
        if bad:
            skip = torch.tensor([i in bad for i in chunk], device=scores["zx"].device)
            for key, value in scores.items():
                fill = self.floor if key in CHANNELS else 0.0
                scores[key] = torch.where(skip, torch.full_like(value, fill), value)
        return scores, bad

    def _gradients(self, model, batch: list[_Sequence], eos: int, pad: int) -> tuple[Tensor, Tensor]:
        """``(G_X, G_Y)``, each ``(B, L, d)`` float32: gradients of every row's l_X and l_Y with respect
        to its input embeddings, for full sequences ``[Z] <eos> [X] <eos> [Y]``. l_X is left out for
        shuffled-rationale rows (their G_X is never used); a VJP that no row needs is skipped and gives
        zeros."""
        embed = model.get_input_embeddings()
        device = embed.weight.device
        tokens = [seq.z + [eos] + seq.x + [eos] + seq.y for seq in batch]
        ids, mask = right_padded(tokens, pad, device)
        scored = []  # (row, position, is_y): the hidden state at position - 1 scores the token there
        for b, seq in enumerate(batch):
            x_start = len(seq.z) + 1
            y_start = x_start + len(seq.x) + 1
            if seq.kind != _RATIONALE_CF:
                scored += [(b, t, False) for t in range(x_start, x_start + len(seq.x))]
            scored += [(b, t, True) for t in range(y_start, y_start + len(seq.y))]
        E = embedding_leaf(embed, ids)
        position_ids = position_ids_from_mask(mask)
        return self._vjps(model, E, ids, mask, position_ids, scored, need_x=True)

    def _vjps(self, model, E, ids, mask, position_ids, scored, need_x, cache=None):
        """Runs the backbone on the leaf embeddings ``E`` (B, L, d) (after a cached prefix, if given),
        sums the log-probabilities of the scored tokens of each row into l_X and l_Y and returns their
        gradients ``(G_X, G_Y)`` with respect to ``E`` in float32 (G_X is None unless ``need_x``)."""
        decoder, head = backbone_and_head(model)
        device = E.device
        has_x = any(not is_y for _, _, is_y in scored)
        has_y = any(is_y for _, _, is_y in scored)
        G_X = torch.zeros_like(E, dtype=torch.float32) if need_x else None
        if not (has_y or (need_x and has_x)):
            return G_X, torch.zeros_like(E, dtype=torch.float32)
        rows_t = torch.tensor([r for r, _, _ in scored], dtype=torch.long, device=device)
        pos_t = torch.tensor([t for _, t, _ in scored], dtype=torch.long, device=device)
        is_y_t = torch.tensor([y for _, _, y in scored], dtype=torch.bool, device=device)
        kwargs = {"use_cache": False} if cache is None else {cache[0]: cache[1], "use_cache": True}
        with autocast_off(device):
            out = decoder(inputs_embeds=E, attention_mask=mask, position_ids=position_ids, **kwargs)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

            def l_sum(which: Tensor) -> Tensor:
                """Summed log-probs of the scored tokens in ``which`` (the hidden state at t-1 scores token t).
                The head runs on these positions alone, a checkpointed chunk at a time, so no (n, vocab)
                logits are kept, and each VJP below recomputes only its own tokens' chunks."""
                rows, pos = rows_t[which], pos_t[which]
                return token_logprobs(head, hidden[rows, pos - 1], ids[rows, pos])[0].sum()

            l_x = l_sum(~is_y_t) if need_x and has_x else None
            l_y = l_sum(is_y_t) if has_y else None
        # Rows are independent sequences, so the gradient of a sum over rows is each row's own gradient.
        if l_x is not None:
            G_X = torch.autograd.grad(l_x, E, retain_graph=l_y is not None)[0].float()
        if l_y is None:
            return G_X, torch.zeros_like(E, dtype=torch.float32)
        return G_X, torch.autograd.grad(l_y, E)[0].float()

    def _rationale_rows(self, model, seqs: list[_Sequence], eos: int, pad: int, size: int) -> list[Tensor]:
        """``J_XY^(k)`` of each shuffled-rationale sequence: G_Y at its X~ rows, ``(|X~|, d)`` float32.

        The prompt prefix ``[Z] <eos>`` is shared by a rollout's K sequences and no scored gradient is
        taken with respect to it, so it runs once per rollout without grad and its key/value cache serves
        the ``[X~] <eos> [Y]`` suffixes, whose embeddings are the gradient leaf. Models whose cache cannot
        be reused this way (sliding-window or non-standard caches) run the full sequences instead.
        """
        embed = model.get_input_embeddings()
        device, d = embed.weight.device, embed.weight.shape[-1]
        out: list[Tensor | None] = [None] * len(seqs)
        work = []
        for j, seq in enumerate(seqs):
            if seq.x and seq.y:
                work.append(j)
            else:  # no X~ rows, or no answer to depend on them: nothing to compute
                out[j] = torch.zeros((len(seq.x), d), dtype=torch.float32, device=device)
        if not work:
            return out  # type: ignore[return-value]
        work.sort(key=lambda j: -(len(seqs[j].x) + len(seqs[j].y)))
        prefixes = {seqs[j].rollout: seqs[j].z + [eos] for j in work}  # one per rollout, in first-seen order
        prefix_of = {rollout: row for row, rollout in enumerate(prefixes)}
        # A checkpointed layer would append the suffix to the cache a second time when it is recomputed.
        prefix = None if self.activation_checkpointing else PrefixCache.build(model, list(prefixes.values()), pad)
        for start in range(0, len(work), size):
            batch = [seqs[j] for j in work[start : start + size]]
            if prefix is None:
                _, G_Y = self._gradients(model, batch, eos, pad)
                offsets = [len(seq.z) + 1 for seq in batch]
            else:
                G_Y = self._suffix_gradients(model, prefix, [prefix_of[s.rollout] for s in batch], batch, eos, pad)
                offsets = [0] * len(batch)
            for row, (j, off) in enumerate(zip(work[start : start + size], offsets)):
                out[j] = G_Y[row, off : off + len(seqs[j].x)].clone()
        return out  # type: ignore[return-value]

    def _suffix_gradients(self, model, prefix: PrefixCache, rows: list[int], batch, eos: int, pad: int) -> Tensor:
        """G_Y ``(B, S, d)`` float32 over the suffix ``[X~] <eos> [Y]`` of each row, run after row
        ``rows[b]`` of the cached prefix."""
        embed = model.get_input_embeddings()
        device = embed.weight.device
        ids, suffix_mask = right_padded([seq.x + [eos] + seq.y for seq in batch], pad, device)
        rows_t = torch.tensor(rows, dtype=torch.long, device=device)
        # Padding rows of the prefix stay masked; positions continue after each row's own prefix.
        mask = torch.cat([prefix.mask[rows_t], suffix_mask], dim=1)
        position_ids = prefix.lengths[rows_t, None] + torch.arange(ids.shape[1], device=device)
        # Padding takes position 0: past a short row's end a position could exceed a learned position table.
        position_ids = position_ids * suffix_mask
        scored = []
        for b, seq in enumerate(batch):
            y_start = len(seq.x) + 1
            scored += [(b, t, True) for t in range(y_start, y_start + len(seq.y))]
        E = embedding_leaf(embed, ids)
        _, G_Y = self._vjps(model, E, ids, mask, position_ids, scored, need_x=False, cache=prefix.select(rows_t))
        return G_Y

    @staticmethod
    def _keep(store: _Slices, seq: _Sequence, g_x: Tensor, g_y: Tensor) -> None:
        """Copy the rows a rollout needs out of one full sequence's gradients (the pass's tensors are
        freed): the base gives J_ZX, J_ZYtot and J_XY, a shuffled prompt its J_ZX and J_ZYtot."""
        nz, nx = len(seq.z), len(seq.x)
        z_rows, x_rows = slice(0, nz), slice(nz + 1, nz + 1 + nx)  # separator rows are dropped
        if seq.kind == _BASE:
            store.zx, store.zy_total, store.xy = g_x[z_rows].clone(), g_y[z_rows].clone(), g_y[x_rows].clone()
        else:
            store.zx_cf[seq.k], store.zy_total_cf[seq.k] = g_x[z_rows].clone(), g_y[z_rows].clone()

    # ------------------------------------------------------------------ scores of finished rollouts

    def _finalize(self, done: list[_Slices], n_z_cf: int, n_x_cf: int) -> dict[str, Tensor]:
        """Scores and diagnostics ``(b,)`` of b finished rollouts, vectorised over zero-padded matrices."""
        J_ZX = _pad_stack([s.zx for s in done])  # (b, Zm, d)
        J_ZYtot = _pad_stack([s.zy_total for s in done])
        J_XY = _pad_stack([s.xy for s in done])  # (b, Xm, d)
        n_x = torch.tensor([s.xy.shape[0] for s in done], device=J_XY.device)
        x_mask = torch.arange(J_XY.shape[1], device=J_XY.device) < n_x[:, None]  # (b, Xm)
        J_ZY = cm.direct_effect(J_ZYtot, J_ZX, J_XY, x_mask)

        out = {
            "zx_norm": cm.frobenius_sq(J_ZX).sqrt(),
            "xy_norm": cm.frobenius_sq(J_XY).sqrt(),
            "zy_norm": cm.frobenius_sq(J_ZY).sqrt(),
            "zy_total_norm": cm.frobenius_sq(J_ZYtot).sqrt(),
        }
        base = {"zx": J_ZX, "xy": J_XY, "zy": J_ZY}
        if not self.hardened:
            for c, J in base.items():
                shape = cm.shape_score(J)
                out[c] = cm.floor_squash(shape, self.floor)
                out[f"{c}_shape"], out[f"{c}_magnitude"] = shape, torch.ones_like(shape)
            return out

        # Counterfactual matrices at their own row counts, zero padded: (b, K, rows, d).
        J_ZX_cf = _stack_cf([[s.zx_cf[k] for k in range(n_z_cf)] for s in done], J_ZX)
        J_ZYtot_cf = _stack_cf([[s.zy_total_cf[k] for k in range(n_z_cf)] for s in done], J_ZX)
        J_XY_cf = _stack_cf([[s.xy_cf[k] for k in range(n_x_cf)] for s in done], J_XY)
        # Direct effect of each shuffled prompt, regressed on the *base* rationale rows, then every
        # counterfactual is aligned to its base matrix (truncate extra rows, zero-pad missing ones).
        J_ZY_cf = cm.direct_effect(J_ZYtot_cf, J_ZX_cf, J_XY[:, None], x_mask[:, None])
        n_z = torch.tensor([s.zx.shape[0] for s in done], device=J_ZX.device)
        z_rows = n_z[:, None].expand(-1, n_z_cf)
        J_ZX_cf = cm.align_rows(J_ZX_cf, z_rows, J_ZX.shape[1])
        J_ZY_cf = cm.align_rows(J_ZY_cf, z_rows, J_ZX.shape[1])
        J_XY_cf = cm.align_rows(J_XY_cf, n_x[:, None].expand(-1, n_x_cf), J_XY.shape[1])
        means = {"zx": _mean_k(J_ZX_cf), "xy": _mean_k(J_XY_cf), "zy": _mean_k(J_ZY_cf)}
        for c, J in base.items():
            out[c], out[f"{c}_shape"], out[f"{c}_magnitude"] = cm.hardened_channel(J, means[c], self.floor)
        return out


# ---------------------------------------------------------------------- helpers


def _checked_given(name: str, given, n: int, k: int) -> list[list[str]] | None:
    """Caller-supplied counterfactual texts, checked: one list of K = ``num_counterfactuals`` texts per
    rollout (K is the scorer's, never re-derived from the lists)."""
    if given is None:
        return None
    if len(given) != n:
        raise ValueError(f"{name} needs one list per rollout: got {len(given)} for {n} rollouts")
    lengths = sorted({len(texts) for texts in given})
    if lengths and lengths != [k]:
        raise ValueError(
            f"{name} holds lists of {lengths} texts, but the scorer's num_counterfactuals is {k}; pass {k} texts "
            "per rollout or set num_counterfactuals to their number"
        )
    return [list(texts) for texts in given]


def _content_span(prompt: str, content: str | None) -> tuple[int, int] | None:
    """``(start, end)`` of the last occurrence of ``content`` (stripped) in ``prompt``; None where the
    content is missing, blank or not in the prompt. Surrounding whitespace is left to the template:
    shuffles keep whitespace runs in place, so nothing is lost."""
    if content is None or not content.strip():
        return None
    text = content.strip()
    start = prompt.rfind(text)
    return None if start < 0 else (start, start + len(text))


def _fit(z: list[int], x: list[int], y: list[int], limit: int) -> tuple[list[int], list[int], list[int]]:
    """Cut ``[Z] <eos> [X] <eos> [Y]`` to ``limit`` positions: the prompt loses its first tokens, then
    the rationale its first tokens, then the answer its last tokens (the end of a prompt holds the
    question and the end of a rationale its conclusion)."""
    excess = len(z) + len(x) + len(y) + 2 - limit
    cut = min(excess, len(z))
    z, excess = z[cut:], excess - cut
    cut = min(excess, len(x))
    x, excess = x[cut:], excess - cut
    y = y[: max(len(y) - excess, 0)]
    return z, x, y


def _keep_last(ids: list[int], cap: int | None) -> list[int]:
    if cap is None or len(ids) <= cap:
        return list(ids)
    return list(ids[len(ids) - cap :])


def _pad_stack(mats: list[Tensor]) -> Tensor:
    """Zero-pad ``(rows_i, d)`` matrices to a common row count and stack: ``(b, max rows, d)``."""
    return torch.nn.utils.rnn.pad_sequence(mats, batch_first=True)


def _stack_cf(mats: list[list[Tensor]], like: Tensor) -> Tensor:
    """``(b, K, max rows, d)``: counterfactual matrix k of rollout j, zero padded past its own rows."""
    b, k, d = len(mats), len(mats[0]), like.shape[-1]
    rows = max((m.shape[0] for row in mats for m in row), default=0)
    out = like.new_zeros((b, k, rows, d))
    for j, row in enumerate(mats):
        for kk, m in enumerate(row):
            out[j, kk, : m.shape[0]] = m
    return out


def _mean_k(J_cf: Tensor) -> Tensor:
    """Mean over the K counterfactuals ``(b, K, rows, d) -> (b, rows, d)``; zeros when K = 0."""
    return J_cf.mean(dim=1) if J_cf.shape[1] else J_cf.new_zeros(J_cf.shape[:1] + J_cf.shape[2:])


