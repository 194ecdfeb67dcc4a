"""Seconds per step and peak memory of plain GRPO versus CE-PO at K = 1 and K = 4 (quickstart settings).

Plain GRPO is ``configs/quickstart.yaml`` as it is (no coherence reward); CE-PO adds
``configs/rewards/cepo.yaml`` (p = 0.2, accuracy 0.7, each channel 0.1, exact scores) with K shuffled
prompts and K shuffled rationales per rollout. Every arm runs in its own process (peak resident memory is
the process's own), arms alternate over the rounds, and the first steps of each run are dropped as
warm-up. Afterwards the script scores one quickstart rollout with K = 4 under two seeds, with K = 1 and with
token caps, and prints how far each approximation lies from the K = 4 score, next to the spread of K = 4
itself.

    python benchmarks/cepo_overhead.py --threads 1 --rounds 2 --steps 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_timing import ROOT, alternate, coherence_overlay, load_average, median  # noqa: E402


def approximation_error(threads: int) -> list[str]:
    """Mean |S(approximation) - S(K=4)| per channel over one quickstart rollout (K = 1; token caps), and
    the same between two seeds of K = 4 (how much the K = 4 score itself moves with its draws)."""
    import torch

    from cepo.answers.parsing import parse_completion
    from cepo.coherence.scorer import CHANNELS, CoherenceScorer
    from cepo.data.shortcut import shortcut_examples
    from cepo.policy.generation import generate_completions
    from cepo.policy.loading import LoraSettings, PolicyConfig, load_policy, load_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = PolicyConfig(lora=LoraSettings(r=8, alpha=16))
    tokenizer, (policy, _) = load_tokenizer(config), load_policy(config)
    prompts = [ex.question for ex in shortcut_examples("train", 16, seed=0)]
    generated = generate_completions(policy, tokenizer, prompts, 8, max_new_tokens=32, temperature=1.0)
    parsed = [parse_completion(text, ["answer"]) for text in tokenizer.batch_decode(
        generated.completion_ids, skip_special_tokens=True)]
    rows = ([p for p in prompts for _ in range(8)], [p.rationale for p in parsed], [p.answer for p in parsed])
    with policy.disable_adapter():
        exact = CoherenceScorer(num_counterfactuals=4).score(policy, tokenizer, *rows, step=1)
        other_seed = CoherenceScorer(num_counterfactuals=4, seed=1).score(policy, tokenizer, *rows, step=1)
        k1 = CoherenceScorer(num_counterfactuals=1).score(policy, tokenizer, *rows, step=1)
        capped = CoherenceScorer(num_counterfactuals=4, max_prompt_tokens=8, max_rationale_tokens=8).score(
            policy, tokenizer, *rows, step=1)
    lines = ["| approximation | " + " | ".join(f"mean abs. error S_{c.upper()}" for c in CHANNELS) + " |",
             "|---|" + "---|" * len(CHANNELS)]
    cases = (("K = 1 vs K = 4", k1), ("K = 4, prompt and rationale capped at 8 tokens vs K = 4", capped),
             ("K = 4, another seed vs K = 4", other_seed))
    for name, result in cases:
        errors = [float((getattr(result, c) - getattr(exact, c)).abs().mean()) for c in CHANNELS]
        lines.append(f"| {name} | " + " | ".join(f"{e:.4f}" for e in errors) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP/MKL too)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over the arms")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of each run")
    parser.add_argument("--no-error", action="store_true", help="skip the approximation errors")
    parser.add_argument("--error-only", action="store_true", help="print only the approximation errors")
    args = parser.parse_args()
    load_before = load_average()
    if args.error_only:
        print("\n".join(approximation_error(args.threads)))
        return
    preset = ["--config", str(ROOT / "configs" / "rewards" / "cepo.yaml")]
    accuracy_only = ["--config", str(ROOT / "configs" / "rewards" / "accuracy_only.yaml")]
    arms = {
        "GRPO (accuracy only)": [],
        "CE-PO, K = 1": preset + ["--config", coherence_overlay(1)],
        "CE-PO, K = 4": preset + ["--config", coherence_overlay(4)],
        # Coherence scored at weight 0: the same trajectory as plain GRPO, so the difference is the scorer.
        "GRPO + coherence at weight 0, K = 4": accuracy_only + ["--config", coherence_overlay(4, (0.0, 0.0, 0.0))],
    }
    pooled = alternate(arms, args.rounds, args.steps, args.warmup, args.threads)
    base = pooled["GRPO (accuracy only)"]
    base_step, base_rss = median(base["step_s"]), base["peak_rss_mb"]
    print()
    print("| arm | s / step | x GRPO | x same step without coherence | generate s | coherence s | update s | "
          "completion tokens | distinct rollouts | peak RSS MB | x GRPO |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, entry in pooled.items():
        step, rss = median(entry["step_s"]), entry["peak_rss_mb"]
        coherence = median(entry["coherence_s"]) if any(entry["coherence_s"]) else 0.0
        distinct = [d for d in entry["distinct"] if d == d]
        share = f"{statistics.mean(distinct):.0%}" if distinct else "-"
        phases = entry["phases"]
        # Within one step the load is the same for both parts, so this ratio resists load swings between runs.
        own = median([t / (t - c) for t, c in zip(entry["step_s"], entry["coherence_s"])])
        print(f"| {name} | {step:.3f} | {step / base_step:.2f} | {own:.2f} | {median(phases['generate']):.3f} | "
              f"{coherence:.3f} | {median(phases['update']):.3f} | {statistics.mean(entry['length']):.1f} | "
              f"{share} | {rss:.0f} | {rss / base_rss:.2f} |")
    print("(medians over steps; update includes the reference log-prob pass; completion tokens: mean length; "
          "'x same step without coherence': median over steps of step / (step - coherence))")
    if not args.no_error:
        print()
        print("\n".join(approximation_error(args.threads)))
    print()
    print(f"command: python benchmarks/cepo_overhead.py {' '.join(sys.argv[1:])}")
    print(f"{args.rounds} rounds x {args.steps} steps per arm after {args.warmup} warm-up steps; "
          f"threads: {args.threads}; {os.cpu_count()} CPUs")
    print(f"1-minute load average: {load_before:.2f} before, {load_average():.2f} after")


if __name__ == "__main__":
    main()
