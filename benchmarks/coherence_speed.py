"""Rollouts per second of the coherence scorer: batched pass versus a plain per-sample loop.

The per-sample loop is how the method's authors ran it: one sequence at a time (the base and every
counterfactual), a full forward with logits over every position, two backward passes each. The batched
scorer packs the base and shuffled-prompt sequences of all rollouts into padded micro-batches, applies the
LM head to the scored positions only and gets every row's gradients from two vector-Jacobian products per
pass; the shuffled-rationale sequences, which need only G_Y at their rationale rows, run just their
``[X~] <eos> [Y]`` suffix after a cached, gradient-free pass over the prompt prefix, with one VJP.
Both score the same rollouts with the same counterfactual texts, and the script checks they agree.

    python benchmarks/coherence_speed.py --rollouts 16 --k 4 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from cepo.coherence import math as cm
from cepo.coherence.counterfactuals import WordShuffle, draw_counterfactuals
from cepo.coherence.scorer import CoherenceScorer
from cepo.data.shortcut import generate_items

def load_model():
    """The embedded policy, loaded like any checkpoint (it ships with the package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cepo.policy.loading import resolve_model_path

    path = resolve_model_path("embedded:tiny-shortcut-llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path), "embedded model (tiny-shortcut-llama)"


# ---------------------------------------------------------------------- the per-sample baseline


def sequence_gradients(model, eos, z, x, y):
    """G_X, G_Y (L x d) of one sequence [Z] <eos> [X] <eos> [Y], full logits."""
    ids = z + [eos] + x + [eos] + y
    with torch.no_grad():
        E = model.get_input_embeddings()(torch.tensor([ids]))
    E = E.detach().requires_grad_()
    logp = torch.log_softmax(model(inputs_embeds=E).logits[0].float(), dim=-1)
    targets = torch.tensor(ids)
    x_pos = torch.arange(len(z) + 1, len(z) + 1 + len(x))
    y_pos = torch.arange(len(z) + len(x) + 2, len(ids))
    l_X = logp[x_pos - 1, targets[x_pos]].sum()
    l_Y = logp[y_pos - 1, targets[y_pos]].sum()
    G_X = torch.autograd.grad(l_X, E, retain_graph=True)[0][0] if len(x) else torch.zeros_like(E[0])
    G_Y = torch.autograd.grad(l_Y, E)[0][0] if len(y) else torch.zeros_like(E[0])
    return G_X, G_Y


def score_per_sample(model, tokenizer, prompts, rationales, answers, cf_prompts, cf_rationales, floor=0.005):
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    out = []
    with torch.enable_grad():
        for Z, X, Y, Zs, Xs in zip(prompts, rationales, answers, cf_prompts, cf_rationales):
            z, x, y = enc(Z), enc(X), enc(Y)
            G_X, G_Y = sequence_gradients(model, eos, z, x, y)
            J_ZX, J_ZYtot, J_XY = G_X[: len(z)], G_Y[: len(z)], G_Y[len(z) + 1 : len(z) + 1 + len(x)]
            J_ZY = cm.direct_effect(J_ZYtot, J_ZX, J_XY)
            zx_cf, zy_cf, xy_cf = [], [], []
            for text in Zs:
                zk = enc(text)
                gx, gy = sequence_gradients(model, eos, zk, x, y)
                zx_cf.append(cm.align_rows(gx[: len(zk)], len(z)))
                zy_cf.append(cm.align_rows(cm.direct_effect(gy[: len(zk)], gx[: len(zk)], J_XY), len(z)))
            for text in Xs:
                xk = enc(text)
                _, gy = sequence_gradients(model, eos, z, xk, y)
                xy_cf.append(cm.align_rows(gy[len(z) + 1 : len(z) + 1 + len(xk)], len(x)))
            row = []
            for J, cfs in ((J_ZX, zx_cf), (J_XY, xy_cf), (J_ZY, zy_cf)):
                Jcf = torch.stack(cfs).mean(0) if cfs else torch.zeros_like(J)
                row.append(float(cm.hardened_channel(J, Jcf, floor)[0]))
            out.append(row)
    return torch.tensor(out)  # (N, 3): zx, xy, zy


# ---------------------------------------------------------------------- main


def load_average() -> float:
    """The 1-minute load average (other work on the machine skews the timings); NaN where unknown."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def timed(fns, repeats):
    """Median wall time and last result of each function; the repeats alternate between the functions,
    so that a change in the machine's load during the run hits all of them alike."""
    times, results = {name: [] for name in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rollouts", type=int, default=16, help="rollouts scored per call")
    parser.add_argument("--k", type=int, default=4, help="counterfactuals per source text")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats, alternating (medians reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--micro-batch-size", type=int, default=16, help="sequences per batched pass")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = load_average()

    model, tokenizer, description = load_model()
    items = generate_items("train", args.rollouts, seed=0)
    prompts = [item.question for item in items]
    rationales = [item.rationale for item in items]
    answers = [str(item.answer) for item in items]
    cf_prompts = draw_counterfactuals(prompts, WordShuffle(), args.k, seed="bench:prompt")
    cf_rationales = draw_counterfactuals(rationales, WordShuffle(), args.k, seed="bench:rationale")
    scorer = CoherenceScorer(micro_batch_size=args.micro_batch_size, num_counterfactuals=args.k)

    def batched():
        r = scorer.score(model, tokenizer, prompts, rationales, answers, cf_prompts, cf_rationales)
        return torch.stack([r.zx, r.xy, r.zy], dim=1)

    def per_sample():
        return score_per_sample(model, tokenizer, prompts, rationales, answers, cf_prompts, cf_rationales)

    batched()  # warm-up of both paths
    per_sample()
    times, scores = timed({"batched": batched, "per_sample": per_sample}, args.repeats)
    t_batched, t_loop = times["batched"], times["per_sample"]
    s_batched, s_loop = scores["batched"], scores["per_sample"]
    n_seq = args.rollouts * (1 + 2 * args.k)
    print(f"model: {description}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    print(
        f"rollouts: {args.rollouts}, K = {args.k} ({n_seq} sequences), threads: {args.threads}, "
        f"micro-batch: {args.micro_batch_size} sequences, median of {args.repeats}"
    )
    print(f"batched scorer:   {args.rollouts / t_batched:8.2f} rollouts/s  ({t_batched:.3f} s)")
    print(f"per-sample loop:  {args.rollouts / t_loop:8.2f} rollouts/s  ({t_loop:.3f} s)")
    print(f"speed-up:         {t_loop / t_batched:8.2f}x")
    print(f"max |score difference|: {float((s_batched - s_loop).abs().max()):.2e}")
    print(f"1-minute load average: {load_before:.2f} before, {load_average():.2f} after ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
