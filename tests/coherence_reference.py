"""A slow, obvious implementation of the coherence reward, written straight from the design notes
(docs/design.md#jacobians and docs/design.md#counterfactuals): one sample and one counterfactual sequence at a time, full-vocabulary logits over
every position, loops instead of padding, singular values from ``svdvals``. Tests compare the batched
scorer against it."""

from __future__ import annotations

import torch
from torch import Tensor


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def capped(ids: list[int], cap: int | None, keep: str) -> list[int]:
    if cap is None or len(ids) <= cap:
        return ids
    return ids[len(ids) - cap :] if keep == "last" else ids[:cap]


def sequence_gradients(model, eos: int, z: list[int], x: list[int], y: list[int]) -> tuple[Tensor, Tensor]:
    """``(G_X, G_Y)``, each ``(L, d)``, for the single sequence ``[Z] <eos> [X] <eos> [Y]``."""
    ids = z + [eos] + x + [eos] + y
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        E = model.get_input_embeddings()(ids_t)
    E = E.detach().requires_grad_()
    logp = torch.log_softmax(model(inputs_embeds=E).logits[0].float(), dim=-1)  # (L, vocab)
    x_positions = range(len(z) + 1, len(z) + 1 + len(x))
    y_positions = range(len(z) + len(x) + 2, len(ids))
    # The logits at position t-1 score token t.
    l_X = sum((logp[t - 1, ids[t]] for t in x_positions), torch.zeros(()))
    l_Y = sum((logp[t - 1, ids[t]] for t in y_positions), torch.zeros(()))
    G_X = torch.autograd.grad(l_X, E, retain_graph=True)[0][0] if len(x) else torch.zeros_like(E[0])
    G_Y = torch.autograd.grad(l_Y, E)[0][0] if len(y) else torch.zeros_like(E[0])
    return G_X, G_Y


def mean_unit_row(J: Tensor) -> Tensor:
    if J.shape[0] == 0:
        return torch.zeros(J.shape[1])
    return torch.stack([row / (row.norm() + 1e-8) for row in J]).mean(0)


def direct_effect(J_ZYtot: Tensor, J_ZX: Tensor, J_XY: Tensor) -> Tensor:
    if J_XY.shape[0] == 0:
        return J_ZYtot
    V = J_ZX * mean_unit_row(J_XY)
    v_sq = (V * V).sum()
    if v_sq <= 1e-12:
        return J_ZYtot
    return J_ZYtot - ((J_ZYtot * V).sum() / (v_sq + 1e-8)) * V


def align(J: Tensor, rows: int) -> Tensor:
    if J.shape[0] >= rows:
        return J[:rows]
    return torch.cat([J, torch.zeros(rows - J.shape[0], J.shape[1])])


def project_out(J: Tensor, Jcf: Tensor) -> Tensor:
    cf_sq = (Jcf * Jcf).sum()
    if cf_sq <= 1e-12:
        return J
    return J - ((J * Jcf).sum() / (cf_sq + 1e-12)) * Jcf


def shape(R: Tensor) -> float:
    if R.numel() == 0:
        return 0.0
    s = torch.linalg.svdvals(R.double()).float()
    total = (s * s).sum()
    return 0.0 if total <= 0 else float(s[0] ** 2 / total)


def channel(J: Tensor, cfs: list[Tensor], floor: float) -> dict[str, float]:
    if cfs:
        Jcf = torch.stack([align(m, J.shape[0]) for m in cfs]).mean(0)
    else:
        Jcf = torch.zeros_like(J)
    R = project_out(J, Jcf)
    sh = shape(R)
    mag = min(max(float((R * R).sum() / ((J * J).sum() + 1e-12)), 0.0), 1.0)
    score = floor + (1 - floor) * min(max((sh * mag) ** 0.5, 0.0), 1.0)
    return {"score": score, "shape": sh, "magnitude": mag}


def score_reference(
    model,
    tokenizer,
    prompt: str,
    rationale: str,
    answer: str,
    counterfactual_prompts: list[str],
    counterfactual_rationales: list[str],
    floor: float = 0.005,
    hardened: bool = True,
    max_prompt_tokens: int | None = None,
    max_rationale_tokens: int | None = None,
    max_answer_tokens: int | None = None,
) -> dict[str, dict[str, float]]:
    """Channel -> {score, shape, magnitude} for one rollout."""
    eos = tokenizer.eos_token_id
    z = capped(encode(tokenizer, prompt), max_prompt_tokens, "last")
    x = capped(encode(tokenizer, rationale), max_rationale_tokens, "last")
    y = capped(encode(tokenizer, answer), max_answer_tokens, "first")
    with torch.enable_grad():
        G_X, G_Y = sequence_gradients(model, eos, z, x, y)
        nz, nx = len(z), len(x)
        J_ZX, J_ZYtot, J_XY = G_X[:nz], G_Y[:nz], G_Y[nz + 1 : nz + 1 + nx]
        J_ZY = direct_effect(J_ZYtot, J_ZX, J_XY)
        if not hardened:
            out = {}
            for name, J in (("zx", J_ZX), ("xy", J_XY), ("zy", J_ZY)):
                sh = shape(J)
                out[name] = {"score": floor + (1 - floor) * sh, "shape": sh, "magnitude": 1.0}
            return out
        zx_cf, zy_cf, xy_cf = [], [], []
        for text in counterfactual_prompts:
            zk = capped(encode(tokenizer, text), max_prompt_tokens, "last")
            gx, gy = sequence_gradients(model, eos, zk, x, y)
            zx_cf.append(gx[: len(zk)])
            zy_cf.append(direct_effect(gy[: len(zk)], gx[: len(zk)], J_XY))
        for text in counterfactual_rationales:
            xk = capped(encode(tokenizer, text), max_rationale_tokens, "last")
            _, gy = sequence_gradients(model, eos, z, xk, y)
            xy_cf.append(gy[nz + 1 : nz + 1 + len(xk)])
    return {
        "zx": channel(J_ZX, zx_cf, floor),
        "xy": channel(J_XY, xy_cf, floor),
        "zy": channel(J_ZY, zy_cf, floor),
    }
