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

On the CPU the peak is resident memory instead: before each phase the kernel's high-water mark
(VmHWM) is reset through /proc/self/clear_refs, and the phase's peak is VmHWM after it minus VmRSS
before it (Linux only). ``--json PATH`` writes every figure to a file; ``benchmarks/memory_model.py
--measure`` runs this script at Qwen2.5-0.5B's shape on the CPU and compares it with the memory model.

    python benchmarks/gpu_step.py                 # H200: must finish in under five minutes
    python benchmarks/gpu_step.py --tiny          # CPU smoke run in seconds (tests/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import gc
import json
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
QWEN2_5_0_5B = {**QWEN2_5_1_5B, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                "sliding_window": 32768, "max_window_layers": 24}  # config.json of Qwen/Qwen2.5-0.5B
QWEN2_5_7B = {**QWEN2_5_1_5B, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
              "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
              "tie_word_embeddings": False}  # config.json of Qwen/Qwen2.5-7B
TINY = {**QWEN2_5_1_5B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048, "bos_token_id": 1, "eos_token_id": 2}
SHAPES = {"0.5b": QWEN2_5_0_5B, "1.5b": QWEN2_5_1_5B, "7b": QWEN2_5_7B, "tiny": TINY}
NAMES = {"0.5b": "Qwen2.5-0.5B shape", "1.5b": "Qwen2.5-1.5B shape", "7b": "Qwen2.5-7B shape", "tiny": "tiny Qwen2"}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def word_tokenizer(vocab_size: int, words: tuple[str, ...] = ()):
    """Word-level tokenizer: specials, the answer tags, ``words``, then words ``w<i>`` up to ``vocab_size``
    ids. With ``words`` the text is also split at punctuation, so that prompts made of those words and
    punctuation map to known tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<answer>", "</answer>", "."]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    if len(vocab) > vocab_size:
        raise ValueError(f"{len(vocab)} words do not fit a vocabulary of {vocab_size}")
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace() if words else pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def write_model(folder: Path, shape: str) -> None:
    """``folder/config.json`` of ``shape`` and a word tokenizer that knows the embedded shortcut task's
    words, digits and punctuation: what ``policy.name_or_path: config:FOLDER`` builds a random-weight
    policy from."""
    from transformers import Qwen2Config

    config = SHAPES[shape]
    words = tuple(chr(c) for c in range(33, 127)) + tuple(str(n) for n in range(10, 1000)) + (
        "Q", "A", "hint", "answer", "finalanswer", "boxed", "</", "/>")
    folder.mkdir(parents=True, exist_ok=True)
    Qwen2Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")}).save_pretrained(folder)
    word_tokenizer(config["vocab_size"], words).save_pretrained(folder)
    print(f"wrote {folder}/config.json ({NAMES[shape]}, vocabulary {config['vocab_size']}) and its tokenizer")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line: CPU peak memory needs Linux")


class PeakMemory:
    """Peak memory of one phase in GiB: on a GPU the caching allocator's peak of allocated bytes (reset
    before the phase); on the CPU the resident high-water mark during the phase minus the resident
    memory before it (VmHWM is reset by writing 5 to /proc/self/clear_refs)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start_kb = 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.start_kb = _status_kb("VmRSS")

    def resident_gb(self) -> float:
        """Memory held now: allocated GPU memory, or the process's resident memory."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**30
        return _status_kb("VmRSS") / 2**20

    def peak_gb(self) -> float:
        """Peak allocated GPU memory since the reset, or on the CPU the rise of the resident peak over the
        resident memory at the reset."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return (_status_kb("VmHWM") - self.start_kb) / 2**20


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
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.5b", help="the policy's architecture")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="storage dtype of the weights")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step (each gets G samples)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--prompt-words", type=int, default=128)
    parser.add_argument("--counterfactuals", type=int, default=4, help="K")
    parser.add_argument("--micro-batch", type=int, default=16, help="log-prob and coherence sequences per pass")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--max-probe", type=int, default=128, help="largest coherence micro-batch to try (0: no probe)")
    parser.add_argument("--time-budget", type=float, default=240.0,
                        help="start no probe size after this many seconds (0: no limit)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--write-model", type=Path, metavar="FOLDER",
                        help="only write FOLDER/config.json of --shape and a tokenizer, for config:FOLDER")
    args = parser.parse_args()
    if args.write_model:
        write_model(args.write_model, "tiny" if args.tiny else args.shape)
        return
    if args.tiny:
        args.shape = "tiny"
        args.new_tokens, args.prompt_words, args.prompts, args.group_size = 12, 16, 2, 2
        args.micro_batch, args.max_probe, args.time_budget = 4, 8, 0.0
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    started = time.perf_counter()

    from cepo.coherence.scorer import CoherenceScorer
    from cepo.policy.generation import generate_completions
    from cepo.policy.logprobs import batched_logprobs, completion_logprobs, micro_batches
    from cepo.rl import aggregate_loss, group_advantages, k3_kl, loss_normalizer

    config = SHAPES[args.shape]
    tokenizer = word_tokenizer(config["vocab_size"])
    memory = PeakMemory(device)
    gc.collect()
    baseline_gb = memory.resident_gb()  # the runtime before the model: libraries, CUDA context excluded
    policy = build_policy(config, dtype, device, args.lora_rank)
    policy.train()
    loaded_gb = memory.resident_gb()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(7, config["vocab_size"], (args.prompts, args.prompt_words), generator=generator)
    prompts = [" ".join(f"w{i}" for i in row.tolist()) + " . Answer in <answer> </answer> ." for row in words]
    command = " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} cores"
    threads = torch.get_num_threads()
    print("command:", command)
    print(f"device {device} ({where}, {threads} torch threads), torch {torch.__version__}, {NAMES[args.shape]} "
          f"(random weights), {args.dtype} weights, LoRA r={args.lora_rank} all-linear, {args.prompts} prompts x "
          f"G={args.group_size}, {args.new_tokens} new tokens, K={args.counterfactuals}, micro-batch {args.micro_batch}")
    rows: list[tuple[str, float, float, float, str]] = []  # label, seconds, peak GB, resident GB before, note

    def phase() -> tuple[float, float]:
        gc.collect()
        synchronize(device)
        before = memory.resident_gb()
        memory.reset()
        return time.perf_counter(), before

    def done(label: str, start: tuple[float, float], note: str = "") -> None:
        synchronize(device)
        rows.append((label, time.perf_counter() - start[0], memory.peak_gb(), start[1], note))

    start = phase()
    generated = generate_completions(policy, tokenizer, prompts, args.group_size, max_new_tokens=args.new_tokens,
                                     temperature=1.0)
    tokens = int(generated.completion_mask.sum())
    done("generate", start)
    rows[-1] = (*rows[-1][:4], f"{tokens} tokens, {tokens / rows[-1][1]:.1f} tokens/s")
    tensors = (generated.prompt_ids, generated.prompt_mask, generated.completion_ids, generated.completion_mask)

    start = phase()
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

    def count(texts_: list[str]) -> int:
        return max(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts_)

    segment_tokens = {"prompt": count(full_prompts), "rationale": count(rationales), "answer": count(answers)}

    def score(micro_batch: int):
        scorer = CoherenceScorer(micro_batch_size=micro_batch, num_counterfactuals=args.counterfactuals)
        with policy.disable_adapter():
            return scorer.score(policy, tokenizer, full_prompts, rationales, answers, step=0)

    start = phase()
    result = score(args.micro_batch)
    done("coherence", start, f"{len(texts)} rollouts, mean S_XY {float(result.xy.mean()):.3f}")

    start = phase()
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

    peak_label = "peak GB" if device.type == "cuda" else "peak GB over start (RSS)"
    print(f"\nresident before loading {baseline_gb:.2f} GB, after loading the weights and adapter {loaded_gb:.2f} GB")
    print(f"{'phase':<12}{'seconds':>10}{peak_label:>26}  note")
    for label, seconds, peak, _, note in rows:
        print(f"{label:<12}{seconds:>10.2f}{peak:>26.3f}  {note}")
    step_seconds = sum(r[1] for r in rows)
    print(f"{'step':<12}{step_seconds:>10.2f}")

    # Largest coherence micro-batch that fits: double until out of memory (or --max-probe).
    fits, size, limit = [], 1, f"--max-probe {args.max_probe} reached"
    while size <= args.max_probe:
        if args.time_budget and time.perf_counter() - started >= args.time_budget:
            limit = f"--time-budget {args.time_budget:.0f} s reached"
            break
        try:
            start = phase()
            score(size)
            done(f"probe {size}", start)
            fits.append((size, rows[-1][1], rows[-1][2]))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            limit = "out of memory at the next size"
            break
        size *= 2
    largest = fits[-1][0] if fits else 0
    if args.max_probe:
        print(f"\n{'coherence micro-batch':<24}{'seconds':>10}{'peak GB':>10}")
        for tried, seconds, peak in fits:
            print(f"{tried:<24}{seconds:>10.2f}{peak:>10.3f}")
        print(f"largest coherence micro-batch that fits: {largest} ({limit})")
    total = time.perf_counter() - started
    print(f"total wall time {total:.1f} s")
    if args.json:
        phases = {label: {"seconds": seconds, "peak_gb": peak, "resident_before_gb": before}
                  for label, seconds, peak, before, _ in rows if not label.startswith("probe")}
        report = {
            "command": command, "device": str(device), "device_name": where, "threads": threads,
            "torch": torch.__version__, "shape": args.shape, "config": config, "dtype": args.dtype,
            "lora_rank": args.lora_rank, "prompts": args.prompts, "group_size": args.group_size,
            "new_tokens": args.new_tokens, "prompt_tokens": int(generated.prompt_ids.shape[1]),
            "counterfactuals": args.counterfactuals, "micro_batch": args.micro_batch,
            "segment_tokens": segment_tokens, "baseline_gb": baseline_gb, "loaded_gb": loaded_gb, "phases": phases,
            "step_seconds": step_seconds, "completion_tokens": tokens,
            "generate_tokens_per_s": tokens / phases["generate"]["seconds"],
            "step_tokens_per_s": tokens / step_seconds,
            "probe": [{"micro_batch": s, "seconds": sec, "peak_gb": p} for s, sec, p in fits],
            "largest_micro_batch": largest, "probe_limit": limit if args.max_probe else None,
            "total_seconds": total,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
