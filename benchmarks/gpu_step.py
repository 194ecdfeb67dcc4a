"""One CE-PO step at a real model's shape on a GPU: seconds per phase, tokens/s, peak memory.

The policy has Qwen2.5-1.5B's architecture (the configuration below, written out so nothing is
downloaded) with random weights in bfloat16 and a LoRA adapter (r = 16, all linear layers). A random
network rarely emits EOS, so every completion runs the full 512 tokens: a worst case for memory.
Prompts are random words of a synthetic word-level tokenizer over the model's 151,936-token vocabulary.

Phases (each timed with the device synchronised, peak memory reset before each):
  generate     P prompts x G = 8 samples, 512 new tokens, temperature 1, KV cache
  reference    k3-KL reference log-probs (adapter disabled), micro-batched, no grad
  coherence    CE-PO scores on the reference network, K = 4 word-shuffle counterfactuals
  update       log-prob pass with gradients + GRPO loss + backward + AdamW step
Then the largest coherence micro-batch (sequences per pass) that fits, doubling until out of memory.

    python benchmarks/gpu_step.py                 # H200: must finish in under five minutes
    python benchmarks/gpu_step.py --tiny          # CPU smoke run in seconds (tests/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN2_5_1_5B = {  # config.json of Qwen/Qwen2.5-1.5B (architecture only)
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536,
    "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
    "vocab_size": 151936, "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "tie_word_embeddings": True, "attention_dropout": 0.0, "use_sliding_window": False,
    "sliding_window": 131072, "max_window_layers": 28, "bos_token_id": 151643, "eos_token_id": 151643,
}
TINY = {**QWEN2_5_1_5B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048, "bos_token_id": 1, "eos_token_id": 2}


def word_tokenizer(vocab_size: int):
    """Word-level tokenizer: specials, the answer tags, then words ``w<i>`` up to ``vocab_size`` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<answer>", "</answer>", "."]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def build_policy(config_dict: dict, dtype: torch.dtype, device: torch.device, rank: int):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from cepo.policy.loading import disable_dropout

    config = Qwen2Config(**{k: v for k, v in config_dict.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    with torch.device(device):
        base = Qwen2ForCausalLM(config).to(dtype)
    disable_dropout(base)
    policy = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    for name, param in policy.named_parameters():
        param.requires_grad_(".default." in name and "lora_" in name)
    return policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model, short completions, CPU: a smoke run")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step (each gets G samples)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--prompt-words", type=int, default=128)
    parser.add_argument("--counterfactuals", type=int, default=4, help="K")
    parser.add_argument("--micro-batch", type=int, default=16, help="log-prob and coherence sequences per pass")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--max-probe", type=int, default=128, help="largest coherence micro-batch to try")
    parser.add_argument("--time-budget", type=float, default=240.0, help="stop probing after this many seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.tiny:
        args.new_tokens, args.prompt_words, args.prompts, args.group_size = 12, 16, 2, 2
        args.micro_batch, args.max_probe = 4, 8
    device = torch.device(args.device)
    dtype = torch.bfloat16
    started = time.perf_counter()

    from cepo.coherence.scorer import CoherenceScorer
    from cepo.policy.generation import generate_completions
    from cepo.policy.logprobs import batched_logprobs, completion_logprobs, micro_batches
    from cepo.rl import aggregate_loss, group_advantages, k3_kl, loss_normalizer

    config = TINY if args.tiny else QWEN2_5_1_5B
    tokenizer = word_tokenizer(config["vocab_size"])
    policy = build_policy(config, dtype, device, args.lora_rank)
    policy.train()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(7, config["vocab_size"], (args.prompts, args.prompt_words), generator=generator)
    prompts = [" ".join(f"w{i}" for i in row.tolist()) + " . Answer in <answer> </answer> ." for row in words]
    print("command:", " ".join(["python", *sys.argv]))
    name = "tiny Qwen2" if args.tiny else "Qwen2.5-1.5B shape"
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else os.cpu_count()}"
          f"{'' if device.type == 'cuda' else ' cores'}), torch {torch.__version__}, {name} (random weights), "
          f"bf16, LoRA r={args.lora_rank} all-linear, {args.prompts} prompts x G={args.group_size}, "
          f"{args.new_tokens} new tokens, K={args.counterfactuals}, micro-batch {args.micro_batch}")
    rows: list[tuple[str, float, float, str]] = []

    def phase(label: str):
        synchronize(device)
        reset_peak(device)
        return time.perf_counter()

    def done(label: str, start: float, note: str = "") -> None:
        synchronize(device)
        rows.append((label, time.perf_counter() - start, peak_gb(device), note))

    start = phase("generate")
    generated = generate_completions(policy, tokenizer, prompts, args.group_size, max_new_tokens=args.new_tokens,
                                     temperature=1.0)
    tokens = int(generated.completion_mask.sum())
    done("generate", start)
    rows[-1] = (*rows[-1][:3], f"{tokens} tokens, {tokens / rows[-1][1]:.0f} tokens/s")
    tensors = (generated.prompt_ids, generated.prompt_mask, generated.completion_ids, generated.completion_mask)

    start = phase("reference")
    with policy.disable_adapter():
        ref_logp, _ = batched_logprobs(policy, tensors, args.micro_batch)
    done("reference", start)

    # A random network marks no answer: take the last few words as the answer Y and the rest as the
    # rationale X, so the coherence pass does the work of a real rollout.
    texts = tokenizer.batch_decode(generated.completion_ids, skip_special_tokens=True)
    split = [text.split() for text in texts]
    answer_words = max(1, args.new_tokens // 64)
    rationales = [" ".join(w[:-answer_words]) for w in split]
    answers = [" ".join(w[-answer_words:]) for w in split]
    full_prompts = [p for p in prompts for _ in range(args.group_size)]

    def score(micro_batch: int):
        scorer = CoherenceScorer(micro_batch_size=micro_batch, num_counterfactuals=args.counterfactuals)
        with policy.disable_adapter():
            return scorer.score(policy, tokenizer, full_prompts, rationales, answers, step=0)

    start = phase("coherence")
    result = score(args.micro_batch)
    done("coherence", start, f"{len(texts)} rollouts, mean S_XY {float(result.xy.mean()):.3f}")

    start = phase("update")
    mask = generated.completion_mask.float()
    rewards = torch.rand(len(texts), generator=generator).to(device)
    advantages = group_advantages(rewards, args.group_size)
    normalizer = loss_normalizer(mask, "dapo")
    for rows_ in micro_batches(len(texts), args.micro_batch):
        logp, _, _ = completion_logprobs(policy, *(t[rows_] for t in tensors), with_entropy=True)
        ratio = torch.exp(logp - logp.detach())  # one optimiser step per rollout: old = current
        surrogate = -torch.minimum(ratio * advantages[rows_, None], ratio.clamp(0.8, 1.2) * advantages[rows_, None])
        per_token = surrogate + 0.001 * k3_kl(logp, ref_logp[rows_])
        aggregate_loss(per_token, mask[rows_], "dapo", normalizer=normalizer).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    done("update", start)

    print(f"\n{'phase':<12}{'seconds':>10}{'peak GB':>10}  note")
    for label, seconds, peak, note in rows:
        print(f"{label:<12}{seconds:>10.2f}{peak:>10.2f}  {note}")
    print(f"{'step':<12}{sum(r[1] for r in rows):>10.2f}")

    # Largest coherence micro-batch that fits: double until out of memory (or --max-probe).
    fits, size = [], 1
    while size <= args.max_probe and time.perf_counter() - started < args.time_budget:
        try:
            start = phase("probe")
            score(size)
            done(f"probe {size}", start)
            fits.append((size, rows[-1][1], rows[-1][2]))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        size *= 2
    print(f"\n{'coherence micro-batch':<24}{'seconds':>10}{'peak GB':>10}")
    for tried, seconds, peak in fits:
        print(f"{tried:<24}{seconds:>10.2f}{peak:>10.2f}")
    largest = fits[-1][0] if fits else 0
    if size > args.max_probe:
        limit = f"--max-probe {args.max_probe} reached"
    elif time.perf_counter() - started >= args.time_budget:
        limit = f"--time-budget {args.time_budget:.0f} s reached"
    else:
        limit = "out of memory at the next size"
    print(f"largest coherence micro-batch that fits: {largest} ({limit})")
    print(f"total wall time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
