"""Coherence channels that follow the causal route Z -> X -> Y by intervention (beyond the paper).

The paper's Jacobian channels ask how strongly, and how concentrated, the answer's likelihood depends on
the rationale's embeddings. They do not ask whether the answer depends on *what the rationale
concludes*. Two options here do, and sit next to the paper's channels (which stay the default):

- **Interventional score** ``S_do``: how much the answer's log-likelihood drops when the rationale's
  conclusion is edited. With ``l(Y | Z, X) = sum_{t in Y} log p(y_t | Z <eos> X <eos> y_<t)`` and K edited
  rationales ``X~_k``,

      drop = l(Y | Z, X) - mean_k l(Y | Z, X~_k)
      S_do = f + (1 - f) * clip(1 - exp(-drop), 0, 1)

  ``1 - exp(-drop)`` is one minus the ratio of the answer's (geometric-mean) probability under the edited
  rationales to its probability under the real one: the share of the answer's probability that the
  rationale's numbers carry. An answer copied from a cue in the prompt keeps its probability when the
  rationale changes and scores near the floor f; an answer read off the rationale loses it and scores
  near 1. A rationale the edit leaves unchanged (no number to edit) scores f.
- **Mediation share** ``S_med``: the share of the answer's input-gradient energy on the rationale rather
  than on the prompt, ``||G_Y[X]||^2 / (||G_Y[X]||^2 + ||G_Y[Z]||^2)``, floored like the other channels.
  Under teacher forcing X is an input, so ``G_Y[Z]`` is the prompt's dependence with the rationale held
  fixed (the direct route); ``G_Y[X]`` is the route through the rationale. One forward and one
  vector-Jacobian product per rollout.

Both use the same ``[Z] <eos> [X] <eos> [Y]`` sequence and log-likelihood alignment (logits at t-1 score
token t) as the Jacobian scorer. The counterfactual edit defaults to :class:`ConclusionEdit`, which
changes only the number the rationale concludes with; :class:`~cepo.coherence.counterfactuals.NumberReplace`
(every number) is the other natural choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cepo.answers.conclusion import conclusion_span, conclusion_value  # noqa: F401 - re-exported
from cepo.coherence.counterfactuals import ConclusionEdit, Counterfactual, draw_rollout_counterfactuals
from cepo.policy.forward import autocast_off, backbone_and_head
from cepo.policy.logprobs import token_logprobs
from cepo.policy.passes import scoring_mode, unwrap_ddp


@dataclass
class InterventionalResult:
    """Per rollout, ``(N,)`` float32 CPU tensors. ``interventional``: S_do in [floor, 1]; ``mediation``:
    S_med in [floor, 1] (None unless the scorer computes it). ``diagnostics``: ``logp_answer`` (l(Y|Z,X)),
    ``logp_answer_edited`` (mean over the K edits), ``drop`` and ``edited`` (1 where an edit changed the
    rationale)."""

    interventional: Tensor
    mediation: Tensor | None = None
    diagnostics: dict[str, Tensor] = field(default_factory=dict)


def interventional_score(drop: Tensor, floor: float) -> Tensor:
    """``f + (1 - f) * clip(1 - exp(-drop), 0, 1)``: the share of the answer's probability lost."""
    return floor + (1.0 - floor) * (1.0 - torch.exp(-drop.clamp_min(0.0))).clamp(0.0, 1.0)


def mediation_share(energy_x: Tensor, energy_z: Tensor, floor: float) -> Tensor:
    """``f + (1 - f) * Ex / (Ex + Ez)`` (f where both energies are zero)."""
    total = energy_x + energy_z
    share = torch.where(total > 0, energy_x / total.clamp_min(1e-30), torch.zeros_like(total))
    return floor + (1.0 - floor) * share.clamp(0.0, 1.0)


class InterventionalScorer:
    """Scores whether each rollout's answer follows its rationale, by editing the rationale's conclusion
    (``S_do``) and, optionally, by the share of the answer's input gradient that sits on the rationale
    (``S_med``). See the module docstring for the formulas.

    Runs in the network's dtype with autocast off, in eval mode; parameters' ``.grad`` are not touched.
    """

    def __init__(
        self,
        num_counterfactuals: int = 2,
        counterfactual: Counterfactual = ConclusionEdit(),
        mediation: bool = True,
        micro_batch_size: int = 16,
        max_prompt_tokens: int | None = None,
        max_rationale_tokens: int | None = None,
        max_answer_tokens: int | None = None,
        floor: float = 0.005,
        seed: int = 0,
    ) -> None:
        """
        Args:
            num_counterfactuals: K, edited rationales per rollout (>= 1); their log-likelihoods are averaged.
            counterfactual: The edit (default: change the concluded number; ``NumberReplace``: every number).
            mediation: Also compute the mediation share S_med (one VJP per rollout).
            micro_batch_size: Sequences per forward pass.
            max_prompt_tokens: Keep at most this many prompt tokens, the last ones (None: no cap).
            max_rationale_tokens: Keep at most this many rationale tokens, the last ones (None: no cap).
            max_answer_tokens: Keep at most this many answer tokens, the first ones (None: no cap).
            floor: Lowest score f; scores lie in [f, 1].
            seed: Base seed of the edits; each rollout's draws depend on (seed, step, its text).
        """
        if num_counterfactuals < 1:
            raise ValueError(f"InterventionalScorer.num_counterfactuals must be >= 1, got {num_counterfactuals}")
        if micro_batch_size < 1:
            raise ValueError(f"InterventionalScorer.micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0.0 <= floor < 1.0:
            raise ValueError(f"InterventionalScorer.floor must lie in [0, 1), got {floor}")
        for name, cap in (("max_prompt_tokens", max_prompt_tokens), ("max_rationale_tokens", max_rationale_tokens),
                          ("max_answer_tokens", max_answer_tokens)):
            if cap is not None and cap < 0:
                raise ValueError(f"InterventionalScorer.{name} must be >= 0 or None, got {cap}")
        self.num_counterfactuals = num_counterfactuals
        self.counterfactual = counterfactual
        self.mediation = mediation
        self.micro_batch_size = micro_batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.max_rationale_tokens = max_rationale_tokens
        self.max_answer_tokens = max_answer_tokens
        self.floor = floor
        self.seed = seed

    def edits(self, prompts: Sequence[str], rationales: Sequence[str], answers: Sequence[str], step: int = 0) -> list[list[str]]:
        """K edited rationales per rollout, drawn by the one seeding rule of every scorer
        (:func:`~cepo.coherence.counterfactuals.draw_rollout_counterfactuals`): identical rollouts get
        identical edits."""
        return draw_rollout_counterfactuals(list(rationales), self.counterfactual, self.num_counterfactuals, self.seed,
                                            step, "rationale", list(prompts), list(rationales), list(answers))

    def score(
        self,
        model: nn.Module,
        tokenizer,
        prompts: Sequence[str],
        rationales: Sequence[str],
        answers: Sequence[str],
        edited_rationales: Sequence[Sequence[str]] | None = None,
        step: int = 0,
    ) -> InterventionalResult:
        """Scores of N rollouts; ``edited_rationales[i]`` (K texts each) replaces the drawn edits."""
        n = len(prompts)
        if len(rationales) != n or len(answers) != n:
            raise ValueError(f"prompts, rationales and answers need one entry per rollout; got {n}, "
                             f"{len(rationales)}, {len(answers)}")
        if n == 0:
            empty = torch.zeros(0)
            return InterventionalResult(empty, empty.clone() if self.mediation else None, {})
        if edited_rationales is None:
            edited = self.edits(prompts, rationales, answers, step)
        else:
            edited = [list(e) for e in edited_rationales]
            k = self.num_counterfactuals
            if len(edited) != n or any(len(e) != k for e in edited):
                raise ValueError(
                    f"edited_rationales needs one list of num_counterfactuals={k} texts per rollout (got "
                    f"{len(edited)} lists of lengths {sorted({len(e) for e in edited})} for {n} rollouts); "
                    "pass K texts each or set the scorer's num_counterfactuals to their number"
                )
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id: the pass joins Z, X and Y with EOS")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        texts = list(dict.fromkeys([*prompts, *rationales, *answers, *(t for row in edited for t in row)]))
        ids = dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"]))

        def cap_last(t, c):
            return list(t) if c is None or len(t) <= c else list(t[len(t) - c :])

        z = [cap_last(ids[t], self.max_prompt_tokens) for t in prompts]
        x = [cap_last(ids[t], self.max_rationale_tokens) for t in rationales]
        y = [list(ids[t]) if self.max_answer_tokens is None else list(ids[t][: self.max_answer_tokens]) for t in answers]
        k = len(edited[0])
        x_cf = [[cap_last(ids[t], self.max_rationale_tokens) for t in row] for row in edited]

        model = unwrap_ddp(model)
        with ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(scoring_mode(model))
            # Base sequences: l(Y|Z,X), and with mediation the VJP of l_Y.
            base_lp, energy_x, energy_z = self._base(model, z, x, y, eos, pad, stack)
            cf_rows = [(i, j) for i in range(n) for j in range(k)]
            with torch.no_grad():
                cf_lp = self._answer_logprobs(model, [(z[i], x_cf[i][j], y[i]) for i, j in cf_rows], eos, pad)
        cf_lp = cf_lp.reshape(n, k)
        changed = torch.tensor([[x_cf[i][j] != x[i] for j in range(k)] for i in range(n)])
        # An edit that left the rationale unchanged carries no intervention: it counts as no drop.
        cf_lp = torch.where(changed, cf_lp, base_lp[:, None])
        drop = base_lp - cf_lp.mean(dim=1)
        score = interventional_score(drop, self.floor)
        has_answer = torch.tensor([bool(t) for t in y])
        score = torch.where(has_answer, score, torch.full_like(score, self.floor))
        diagnostics = {
            "logp_answer": base_lp, "logp_answer_edited": cf_lp.mean(dim=1), "drop": drop,
            "edited": changed.any(dim=1).float(),
        }
        mediation = mediation_share(energy_x, energy_z, self.floor) if self.mediation else None
        return InterventionalResult(score.float(), None if mediation is None else mediation.float(), diagnostics)

    # ------------------------------------------------------------------ passes

    def _layout(self, triples, eos, pad, device):
        """Right-padded ``[Z] <eos> [X] <eos> [Y]`` ids and mask ``(B, L)``, plus per row the Z, X and Y
        position ranges."""
        seqs = [zz + [eos] + xx + [eos] + yy for zz, xx, yy in triples]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        spans = []
        for b, (s, (zz, xx, yy)) in enumerate(zip(seqs, triples)):
            ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[b, : len(s)] = 1
            x0 = len(zz) + 1
            y0 = x0 + len(xx) + 1
            spans.append((range(0, len(zz)), range(x0, x0 + len(xx)), range(y0, y0 + len(yy))))
        return ids.to(device), mask.to(device), spans

    def _forward_answer(self, model, E, ids, mask, spans):
        """Per row, l(Y | Z, X) from leaf or plain embeddings ``E`` (B, L, d)."""
        decoder, head = backbone_and_head(model)
        rows = [b for b, (_, _, ys) in enumerate(spans) for _ in ys]
        pos = [t for _, _, ys in spans for t in ys]
        out_lp = torch.zeros(len(spans), dtype=torch.float32, device=E.device)
        if not pos:
            return out_lp
        position_ids = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        with autocast_off(E.device):
            out = decoder(inputs_embeds=E, attention_mask=mask, position_ids=position_ids, use_cache=False)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            rows_t = torch.tensor(rows, dtype=torch.long, device=E.device)
            pos_t = torch.tensor(pos, dtype=torch.long, device=E.device)
            logp, _ = token_logprobs(head, hidden[rows_t, pos_t - 1], ids[rows_t, pos_t])
        return out_lp.index_add(0, rows_t, logp.float())

    def _answer_logprobs(self, model, triples, eos, pad) -> Tensor:
        embed = model.get_input_embeddings()
        device = embed.weight.device
        order = sorted(range(len(triples)), key=lambda i: -sum(len(p) for p in triples[i]))
        out = torch.zeros(len(triples), dtype=torch.float32)
        for start in range(0, len(order), self.micro_batch_size):
            chunk = order[start : start + self.micro_batch_size]
            ids, mask, spans = self._layout([triples[i] for i in chunk], eos, pad, device)
            lp = self._forward_answer(model, embed(ids), ids, mask, spans)
            out[torch.tensor(chunk)] = lp.detach().float().cpu()
        return out

    def _base(self, model, z, x, y, eos, pad, stack):
        n = len(z)
        if not self.mediation:
            with torch.no_grad():
                return self._answer_logprobs(model, list(zip(z, x, y)), eos, pad), None, None
        stack.enter_context(torch.enable_grad())
        embed = model.get_input_embeddings()
        device = embed.weight.device
        lp_all = torch.zeros(n, dtype=torch.float32)
        ex, ez = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        order = sorted(range(n), key=lambda i: -(len(z[i]) + len(x[i]) + len(y[i])))
        for start in range(0, n, self.micro_batch_size):
            chunk = order[start : start + self.micro_batch_size]
            ids, mask, spans = self._layout([(z[i], x[i], y[i]) for i in chunk], eos, pad, device)
            with torch.no_grad():
                E = embed(ids)
            E = E.detach().requires_grad_()  # a leaf: the VJP stops here and touches no parameter
            lp = self._forward_answer(model, E, ids, mask, spans)
            if lp.requires_grad:
                # Rows are independent sequences: the gradient of the sum is each row's own gradient.
                (G,) = torch.autograd.grad(lp.sum(), E)
                energy = G.detach().double().pow(2).sum(-1)  # (B, L)
            else:
                energy = torch.zeros(ids.shape, dtype=torch.float64, device=device)
            for row, i in enumerate(chunk):
                zs, xs, _ = spans[row]
                ez[i] = float(energy[row, zs.start : zs.stop].sum())
                ex[i] = float(energy[row, xs.start : xs.stop].sum())
            lp_all[torch.tensor(chunk)] = lp.detach().float().cpu()
        return lp_all, ex, ez
