"""Peak memory of a log-prob pass with gradients at a real vocabulary size.

``--pass update`` (default): the update's pass (forward + entropy + backward). Compares the full-logits
computation (the head on every completion position of the micro-batch at once, then log-softmax and
entropy over the whole ``(batch, T, vocab)`` float32 tensor) with cepo's chunked pass
(:func:`cepo.policy.logprobs.completion_logprobs`).

``--pass scorer``: the coherence scorer's pass (one forward over ``[Z] <eos> [X] <eos> [Y]`` and the two
VJPs of l_X and l_Y with respect to the input embeddings). Compares the head on every scored position at
once with the head in checkpointed chunks (:func:`cepo.policy.logprobs.token_logprobs`, what the scorer
runs).

Each variant runs in its own process, alternately, and reports its peak resident memory above the resident
memory just before the pass, in units of one float32 logits tensor of the scored tokens. CPU is enough:
the quantity is allocation, not speed.

    python benchmarks/logprob_memory.py                       # vocab 151,936 (Qwen2.5), 4 x 128 tokens
    python benchmarks/logprob_memory.py --batch 8 --tokens 256 --repeats 2
    python benchmarks/logprob_memory.py --pass scorer --batch 4 --tokens 256 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from cepo.policy.forward import backbone_and_head, gather_logprobs, hidden_states
    from cepo.policy.logprobs import completion_logprobs
    from cepo.rl import entropy_from_logits

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.model.embed_tokens.weight.requires_grad_(False)
    model.lm_head.weight.requires_grad_(False)  # frozen, as under LoRA; the layers stay trainable
    prompt = torch.randint(0, args.vocab, (args.batch, 16))
    completion = torch.randint(0, args.vocab, (args.batch, args.tokens))
    ones_p, ones_c = torch.ones_like(prompt), torch.ones_like(completion)
    advantages = torch.randn(args.batch, args.tokens)

    def full():
        _, head = backbone_and_head(model)
        ids, mask = torch.cat([prompt, completion], 1), torch.cat([ones_p, ones_c], 1)
        logits = head(hidden_states(model, mask, input_ids=ids)[:, prompt.shape[1] - 1 : -1]).float()
        logp = gather_logprobs(logits, completion)
        entropy = entropy_from_logits(logits.detach())
        return logp, entropy

    def chunked():
        logp, entropy, _ = completion_logprobs(model, prompt, ones_p, completion, ones_c, with_entropy=True)
        return logp, entropy

    def update(variant):
        logp, _ = {"full": full, "chunked": chunked}[variant]()
        (logp * advantages).sum().backward()
        return float(logp.sum())

    def scorer(variant):
        import cepo.policy.logprobs as logprobs
        from cepo.coherence.scorer import _BASE, CoherenceScorer, _Sequence

        if variant == "full":  # one chunk holding every scored position: the head at once, not checkpointed
            logprobs.chunk_tokens_for = lambda *_, **__: 1 << 40
        x_len = args.tokens - 16  # the rationale; a 16-token answer
        batch = [_Sequence(b, _BASE, 0, prompt[b].tolist(), completion[b, :x_len].tolist(),
                           completion[b, x_len:].tolist()) for b in range(args.batch)]
        with torch.enable_grad():
            G_X, G_Y = CoherenceScorer()._gradients(model, batch, eos=1, pad=0)
        return float(G_X.abs().sum() + G_Y.abs().sum())

    run = update if args.pass_ == "update" else scorer
    run(args.child)  # warm-up: allocator pools, lazy initialisation
    model.zero_grad(set_to_none=True)
    before = rss_mb()
    start = time.perf_counter()
    checksum = run(args.child)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    print(json.dumps({"before_mb": before, "peak_mb": peak, "seconds": seconds, "checksum": checksum}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128, help="completion tokens per row")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pass", dest="pass_", choices=["update", "scorer"], default="update",
                        help="the update's log-prob pass, or the coherence scorer's forward and two VJPs")
    parser.add_argument("--child", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return
    logits_mb = args.batch * args.tokens * args.vocab * 4 / 2**20
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"load: {os.getloadavg()[0]:.2f} (1-min), threads {args.threads}, torch {torch.__version__}")
    print(f"{args.pass_} pass, vocab {args.vocab}, {args.batch} x {args.tokens} completion tokens: "
          f"one float32 logits tensor = {logits_mb:.0f} MB")
    results: dict[str, list[float]] = {"full": [], "chunked": []}
    seconds: dict[str, list[float]] = {"full": [], "chunked": []}
    checksums = {}
    for _ in range(args.repeats):
        for variant in results:
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", variant],
                                 capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results[variant].append(row["peak_mb"] - row["before_mb"])
            seconds[variant].append(row["seconds"])
            checksums[variant] = row["checksum"]
    print(f"{'pass':<10}{'peak above start (MB)':>24}{'x logits tensor':>18}{'seconds (min)':>16}")
    for variant, values in results.items():
        peak = max(values)
        print(f"{variant:<10}{peak:>24.0f}{peak / logits_mb:>18.2f}{min(seconds[variant]):>16.2f}")
    what = "sum of log-probs" if args.pass_ == "update" else "sum of |gradients|"
    print(f"{what}: full {checksums['full']:.4f}, chunked {checksums['chunked']:.4f}")


if __name__ == "__main__":
    main()
