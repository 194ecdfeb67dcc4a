"""A memory model of one CE-PO step, checked against a measured step, and the settings it says fit a card.

Every phase's memory is a formula of the model's shape (layers L, hidden size h, MLP size I, key/value
width kv, attention heads n_h, vocabulary V), the LoRA rank r, the token counts (prompt Z, completion C,
answer Y) and the micro-batches. Bytes of activations that autograd saves per token and per decoder
layer (Qwen2 layer, PyTorch SDPA attention; counted with ``torch.autograd.graph.saved_tensors_hooks``,
which ``tests/test_memory_model.py`` repeats at small shapes):

    mode            LoRA adapter off (scorer, reference)      LoRA r on all linear layers (update)
    float32         16h + 12I + 8kv + 4n_h + 8                 24h + 16I + 8kv + 4n_h + 8 + 28r
    bf16-mixed      12h +  6I + 4kv + 4n_h + 8                 24h +  8I + 4kv + 4n_h + 8 + 14r
    bfloat16        12h +  6I + 4kv + 4n_h + 8                 36h + 10I + 4kv + 4n_h + 8 + 28r

(``bf16-mixed``: float32 weights under bfloat16 autocast, which also saves a bfloat16 copy of every
linear weight for the backward pass, 2 bytes per base and LoRA parameter; ``bfloat16``: bfloat16 weights,
no autocast.) What each phase holds above the weights, the adapter and its AdamW state (16 bytes per
LoRA parameter):

    generate   KV cache 2 L kv (Z + C) B b_act, B = prompts x G rows; the prefill of one layer,
               B Z a_0; the last position's float32 logits, 3 B V 4
    reference  (no grad, micro-batch m) the prompt's KV cache for m rows, 2 L kv Z m b_act; one layer's
               working set m C a_0; 2 chunks of float32 logits (2^24 values each)
    update     (micro-batch m) saved activations t L a_r with t = m C + ceil(m / G) Z (the group's shared
               prompt runs once); one layer's gradients t a_r; the bf16 weight copies of bf16-mixed;
               3 logits chunks (the head is checkpointed per chunk). With
               ``policy.gradient_checkpointing``: t = m (Z + C) (no shared prompt), saved layer inputs
               t L h 4, and one layer recomputed and differentiated, 2 t a_r
    coherence  (float32, autocast off, s = ``scorer.micro_batch_size`` sequences of T = Z + C + 2 tokens
               per pass, one forward and two VJPs) saved activations s T L a_0 and one layer's
               gradients s T a_0; the embedding leaf and its two gradients, 3 s T h 4; 3 chunks of
               float32 logits at the s C scored positions (the head is checkpointed per chunk);
               the gradient rows each of the chunk's s rollouts keeps, s (1 + K)(2Z + C - Y) h 4. With
               ``scorer.activation_checkpointing``: layer inputs s T L h 4 and 2 s T a_0

The peak is the resident part plus the largest phase. ``--measure`` runs ``benchmarks/gpu_step.py`` at
Qwen2.5-0.5B's shape on the CPU (float32, short completions) and prints each phase's predicted memory
beside its measured peak resident memory; ``--compare FILE`` does the same for a JSON file written by
``gpu_step.py --json`` (a GPU run, for instance). Without either, the table of settings that fit.

    python benchmarks/memory_model.py                                  # the 24 / 48 / 80 GB table
    python benchmarks/memory_model.py --breakdown 1.5B 512             # every term of one row
    python benchmarks/memory_model.py --measure --threads 1            # one real-shape step on the CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

LOGITS_CHUNK = 1 << 24  # float32 logits per chunk of the log-prob passes (cepo.policy.logprobs)
GIB = 2**30
MODES = ("float32", "bf16-mixed", "bfloat16")
USABLE = 0.9  # share of a card's memory the model may fill: the CUDA context and fragmentation take the rest


@dataclass(frozen=True)
class Shape:
    """A decoder's dimensions (a Qwen2-style ``config.json``)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = True

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        return cls(config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
                   config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"],
                   bool(config.get("tie_word_embeddings", False)))

    @property
    def kv(self) -> int:
        """Width of the key (or value) projection: key/value heads x head size."""
        return self.kv_heads * (self.hidden // self.heads)


@dataclass(frozen=True)
class Step:
    """One step's sizes and memory settings."""

    prompt: int  # Z: prompt tokens
    completion: int  # C: completion tokens (rationale + answer)
    answer: int  # Y: answer tokens
    prompts: int = 16  # prompts per step
    group: int = 8  # G
    counterfactuals: int = 4  # K
    update_micro_batch: int = 16  # m (model.micro_batch_size; the reference pass uses it too)
    scorer_micro_batch: int = 16  # s (scorer.micro_batch_size)
    lora_rank: int = 16
    mode: str = "bf16-mixed"  # the policy's passes; the scorer runs in the weights' dtype
    gradient_checkpointing: bool = False  # policy.gradient_checkpointing
    scorer_checkpointing: bool = False  # scorer.activation_checkpointing


def base_parameters(shape: Shape) -> int:
    """Parameters of the base model: embedding, L decoder layers (q/k/v with biases, o, gated MLP, two
    norms), the final norm and, unless tied to the embedding, the LM head."""
    h, kv = shape.hidden, shape.kv
    layer = linear_parameters(shape) + h + 2 * kv + 2 * h  # + q/k/v biases + norms
    return shape.vocab * h * (1 if shape.tied else 2) + shape.layers * layer + h


def linear_parameters(shape: Shape) -> int:
    """Weights of one decoder layer's linear maps (q, k, v, o, gate, up, down), without biases."""
    h, kv, i = shape.hidden, shape.kv, shape.intermediate
    return 2 * h * h + 2 * h * kv + 3 * h * i


def lora_parameters(shape: Shape, rank: int) -> int:
    """LoRA A and B matrices on every linear map of every layer: r (in + out) each."""
    h, kv, i = shape.hidden, shape.kv, shape.intermediate
    return shape.layers * rank * (2 * h + 2 * (h + kv) + 2 * h + 2 * (h + i) + (i + h))


def activation_bytes(shape: Shape, mode: str, lora_rank: int = 0) -> int:
    """Bytes autograd saves per token and decoder layer (the table in this module's docstring);
    ``lora_rank`` 0: the adapter is off (or absent)."""
    h, i, kv, n = shape.hidden, shape.intermediate, shape.kv, shape.heads
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "float32":
        base, lora = 16 * h + 12 * i + 8 * kv + 4 * n + 8, (8 * h + 4 * i + 28 * lora_rank)
    elif mode == "bf16-mixed":
        base, lora = 12 * h + 6 * i + 4 * kv + 4 * n + 8, (12 * h + 2 * i + 14 * lora_rank)
    else:
        base, lora = 12 * h + 6 * i + 4 * kv + 4 * n + 8, (24 * h + 4 * i + 28 * lora_rank)
    return base + (lora if lora_rank else 0)


def weight_bytes(mode: str) -> int:
    return 2 if mode == "bfloat16" else 4


def act_element_bytes(mode: str) -> int:
    """Bytes of one element of the tensors a pass computes with (keys and values, hidden states)."""
    return 4 if mode == "float32" else 2


def resident(shape: Shape, step: Step) -> dict[str, int]:
    """Bytes held through the whole step: the base weights, the LoRA weights (float32) and their
    gradients and AdamW moments (4 + 4 + 8 bytes each)."""
    return {"weights": base_parameters(shape) * weight_bytes(step.mode),
            "lora + AdamW": 16 * lora_parameters(shape, step.lora_rank)}


def logits_chunk_bytes(tokens: int, vocab: int) -> int:
    """One chunk of float32 logits of a pass over ``tokens`` positions (cepo.policy.logprobs)."""
    return min(tokens, max(1, LOGITS_CHUNK // vocab)) * vocab * 4


def phases(shape: Shape, step: Step) -> dict[str, int]:
    """Bytes each phase holds above :func:`resident` at its peak."""
    L, h, kv, V = shape.layers, shape.hidden, shape.kv, shape.vocab
    Z, C, Y, K = step.prompt, step.completion, step.answer, step.counterfactuals
    b = act_element_bytes(step.mode)
    a0 = activation_bytes(shape, step.mode)  # adapter off
    ar = activation_bytes(shape, step.mode, step.lora_rank)
    rows = step.prompts * step.group
    m = min(step.update_micro_batch, rows)
    out = {}
    out["generate"] = 2 * L * kv * (Z + C) * rows * b + rows * Z * a0 + 3 * rows * V * 4
    chunk = logits_chunk_bytes(m * C, V)
    out["reference"] = 2 * L * kv * Z * m * b + m * C * a0 + 2 * chunk
    casts = 2 * (linear_parameters(shape) + lora_parameters(shape, step.lora_rank) // L) if step.mode == "bf16-mixed" else 0
    if step.gradient_checkpointing:
        t = m * (Z + C)
        update = t * L * h * 4 + 2 * t * ar + casts
    else:
        t = m * C + math.ceil(m / step.group) * Z
        update = t * L * ar + t * ar + L * casts
    out["update"] = update + 3 * chunk
    out["coherence"] = sum(coherence_terms(shape, step).values())
    return out


def coherence_terms(shape: Shape, step: Step) -> dict[str, int]:
    """The coherence pass's bytes above the resident part, term by term (the module docstring)."""
    L, h, V = shape.layers, shape.hidden, shape.vocab
    Z, C, Y, K = step.prompt, step.completion, step.answer, step.counterfactuals
    # The scorer runs in the weights' own dtype with autocast off: float32 weights give a float32 pass.
    scorer_mode = "bfloat16" if step.mode == "bfloat16" else "float32"
    s = step.scorer_micro_batch
    T = Z + C + 2
    a0s = activation_bytes(shape, scorer_mode)
    eb = act_element_bytes(scorer_mode)
    saved = s * T * (L * h * eb + 2 * a0s) if step.scorer_checkpointing else s * T * (L + 1) * a0s
    return {"activations": saved, "embedding leaf + 2 gradients": 3 * s * T * h * 4,
            "logits at scored positions": 3 * logits_chunk_bytes(s * C, V),
            "rows kept per rollout": s * (1 + K) * (2 * Z + C - Y) * h * 4}


def peak(shape: Shape, step: Step) -> int:
    return sum(resident(shape, step).values()) + max(phases(shape, step).values())


# ---------------------------------------------------------------------- the table of settings that fit

MODELS = {"0.5B": "0.5b", "1.5B": "1.5b", "7B": "7b"}
CARDS = (24, 48, 80)
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def shapes() -> dict[str, Shape]:
    from gpu_step import SHAPES

    return {label: Shape.from_config(SHAPES[key]) for label, key in MODELS.items()}


def table_step(tokens: int, **changes) -> Step:
    """The table's step: ``tokens`` per sequence, a quarter prompt and three quarters completion with
    a 16-token answer, 16 prompts x G = 8, K = 4, LoRA r = 16, bf16-mixed."""
    return replace(Step(prompt=tokens // 4, completion=tokens - tokens // 4, answer=16), **changes)


def largest(shape: Shape, step: Step, capacity: float, field: str, sizes=SIZES) -> int:
    """The largest ``field`` (a micro-batch) in ``sizes`` whose phase fits with generation and the
    resident memory; 0 if none does."""
    best = 0
    for size in sizes:
        trial = replace(step, **{field: size})
        held = sum(resident(shape, trial).values())
        need = phases(shape, trial)
        phase = "update" if field == "update_micro_batch" else "coherence"
        if held + max(need[phase], need["generate"], need["reference"]) <= capacity:
            best = size
    return best


def fit_table(tokens_list=(512, 1024), cards=CARDS, mode: str = "bf16-mixed") -> list[str]:
    lines = [
        "| model | tokens | card | weights + LoRA state GB | update m, no / with checkpointing | "
        "scorer s, no / with checkpointing | peak GB at m = 16, s = 16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, shape in shapes().items():
        for tokens in tokens_list:
            step = table_step(tokens, mode=mode)
            held = sum(resident(shape, step).values())
            for card in cards:
                capacity = card * GIB * USABLE
                cells = []
                for field, flag in (("update_micro_batch", "gradient_checkpointing"),
                                    ("scorer_micro_batch", "scorer_checkpointing")):
                    sizes = SIZES[:5] if field == "update_micro_batch" else SIZES
                    found = [largest(shape, replace(step, **{flag: on}), capacity, field, sizes) for on in (False, True)]
                    cells.append(" / ".join(str(f) if f else "-" for f in found))
                lines.append(f"| {label} | {tokens} | {card} GB | {held / GIB:.1f} | {cells[0]} | {cells[1]} | "
                             f"{peak(shape, step) / GIB:.1f} |")
    return lines


def breakdown(label: str, tokens: int) -> list[str]:
    """Every term of one table row's step at m = 16, s = 16, without checkpointing."""
    shape, step = shapes()[label], table_step(tokens)
    lines = [f"{label} at {tokens} tokens (Z = {step.prompt}, C = {step.completion}, Y = {step.answer}), "
             f"{step.prompts} prompts x G = {step.group}, K = {step.counterfactuals}, m = s = 16, {step.mode}", "",
             "| part | GB |", "|---|---|"]
    for name, value in resident(shape, step).items():
        lines.append(f"| resident: {name} | {value / GIB:.2f} |")
    for name, value in phases(shape, step).items():
        lines.append(f"| {name} | {value / GIB:.2f} |")
    for name, value in coherence_terms(shape, step).items():
        lines.append(f"| coherence: {name} | {value / GIB:.2f} |")
    return lines


# ---------------------------------------------------------------------- the check against a measured step

MEASURE = ["--shape", "0.5b", "--dtype", "float32", "--device", "cpu", "--prompts", "1", "--group-size", "2",
           "--new-tokens", "16", "--prompt-words", "8", "--counterfactuals", "1", "--micro-batch", "2",
           "--max-probe", "0"]


def step_of(report: dict) -> tuple[Shape, Step]:
    """The shape and step a ``gpu_step.py --json`` report ran (its policy passes ran without autocast,
    in the weights' dtype; one micro-batch size for every pass)."""
    tokens = report["segment_tokens"]
    step = Step(prompt=tokens["prompt"], completion=report["new_tokens"], answer=tokens["answer"],
                prompts=report["prompts"], group=report["group_size"], counterfactuals=report["counterfactuals"],
                update_micro_batch=report["micro_batch"], scorer_micro_batch=report["micro_batch"],
                lora_rank=report["lora_rank"], mode=report["dtype"])
    return Shape.from_config(report["config"]), step


def compare(report: dict) -> list[str]:
    """Predicted against measured memory per phase for a ``gpu_step.py --json`` report. The update is
    the first optimiser step, so its measured rise includes the LoRA gradients and AdamW moments (12
    bytes per LoRA parameter), which the prediction adds."""
    shape, step = step_of(report)
    predicted = phases(shape, step)
    predicted["update"] += 12 * lora_parameters(shape, step.lora_rank)
    weights = resident(shape, step)["weights"] + 4 * lora_parameters(shape, step.lora_rank)
    kind = "peak allocated" if report["device"].startswith("cuda") else "peak resident above the phase's start"
    lines = [f"| phase | predicted GB | measured GB ({kind}) | measured / predicted |", "|---|---|---|---|"]
    loaded = report["loaded_gb"] - report.get("baseline_gb", 0.0)
    lines.append(f"| weights + LoRA | {weights / GIB:.3f} | {loaded:.3f} | {loaded / (weights / GIB):.2f} |")
    for name in ("generate", "reference", "coherence", "update"):
        measured = report["phases"][name]["peak_gb"]
        lines.append(f"| {name} | {predicted[name] / GIB:.3f} | {measured:.3f} | {measured / (predicted[name] / GIB):.2f} |")
    return lines


def load_average() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", help="run one 0.5B-shaped step on the CPU and compare")
    parser.add_argument("--compare", type=Path, help="compare a gpu_step.py --json report with the model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the measured step")
    parser.add_argument("--json", type=Path, help="with --measure: keep the step's report here")
    parser.add_argument("--mode", choices=MODES, default="bf16-mixed", help="the table's precision")
    parser.add_argument("--breakdown", nargs=2, metavar=("MODEL", "TOKENS"),
                        help="every term of one table row instead of the table, e.g. 1.5B 512")
    args = parser.parse_args()
    print("command: python benchmarks/memory_model.py", " ".join(sys.argv[1:]))
    if args.measure:
        out = args.json or Path(tempfile.mkdtemp(prefix="cepo-memory-")) / "step.json"
        # glibc returns blocks above 64 KB to the system when freed, so resident memory follows the
        # tensors alive rather than the allocator's free lists.
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
               "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
        load_before = load_average()
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), *MEASURE, "--json", str(out)],
                       env=env, check=True, cwd=ROOT)
        print(f"threads {args.threads}; load average (1, 5, 15 min) before {load_before}, after {load_average()}")
        args.compare = out
    if args.compare:
        report = json.loads(args.compare.read_text())
        shape, step = step_of(report)
        print(f"\n{report['command']}")
        print(f"{report['device']} ({report['device_name']}, {report['threads']} threads), {report['shape']} shape, "
              f"{report['dtype']}, Z = {step.prompt}, C = {step.completion}, Y = {step.answer} tokens, "
              f"{step.prompts} prompts x G = {step.group}, K = {step.counterfactuals}, "
              f"micro-batch {step.update_micro_batch}")
        print("\n".join(compare(report)))
        return
    if args.breakdown:
        print("\n" + "\n".join(breakdown(args.breakdown[0], int(args.breakdown[1]))))
        return
    print(f"\nSettings that fit ({args.mode} policy passes, float32 scorer; largest power of two up to 16 for "
          f"the update's micro-batch m and up to 256 for scorer.micro_batch_size s; {USABLE:.0%} of the card)\n")
    print("\n".join(fit_table(mode=args.mode)))


if __name__ == "__main__":
    main()
