"""How CE-PO's step time and coherence time grow with G, completion length, K and model width.

Random-weight models of the embedded architecture (Llama-style, 4 layers, head size 32, MLP 3x hidden,
the character tokenizer) at hidden 128 / 256 / 512 are written to a temporary folder; every run is the
quickstart (16 prompts per step) with the ``cepo`` reward preset, changing one factor at a time from the
base G = 8, 32 new tokens, K = 4, hidden 128. Random weights never stop early, so every completion has
the full length and every rollout is distinct: the scorer's worst case. Each run is its own process;
runs alternate over the rounds and the first step of each is dropped as warm-up.

    python benchmarks/scaling.py --threads 1 --rounds 1 --steps 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_timing import ROOT, alternate, coherence_overlay, load_average, median  # noqa: E402

BASE = {"G": 8, "tokens": 32, "K": 4, "hidden": 128}


def random_model(hidden: int, folder: Path) -> tuple[str, float]:
    """A random-weight copy of the embedded architecture at ``hidden`` width; its path and millions of
    parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from cepo.policy.loading import resolve_model_path

    source = Path(resolve_model_path("embedded:tiny-shortcut-llama"))
    folder.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name not in ("model.safetensors", "config.json", "README.md", "eval_results.json"):
            shutil.copy(item, folder / item.name)
    config = AutoConfig.from_pretrained(source)
    config.hidden_size, config.intermediate_size = hidden, 3 * hidden
    config.num_attention_heads = config.num_key_value_heads = hidden // config.head_dim
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return str(folder), sum(p.numel() for p in model.parameters()) / 1e6


def memory_per_sequence(hidden: int, length: int, batch: int, checkpointing: bool) -> float:
    """Extra peak resident MB per sequence of one scoring pass (one forward, two VJPs) over ``batch``
    sequences of ``length`` tokens, in a fresh process: the high-water mark after the pass minus the one
    after a warm-up pass over one short sequence, divided by ``batch``."""
    import json
    import subprocess

    code = f"""
import json, random, resource, torch
torch.set_num_threads(1)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from cepo.coherence.scorer import CoherenceScorer
from cepo.policy.loading import resolve_model_path
path = resolve_model_path("embedded:tiny-shortcut-llama")
config = AutoConfig.from_pretrained(path)
config.hidden_size, config.intermediate_size = {hidden}, {3 * hidden}
config.num_attention_heads = config.num_key_value_heads = {hidden} // config.head_dim
config.max_position_embeddings = max(config.max_position_embeddings, {length} + 8)
torch.manual_seed(0)
model, tok = AutoModelForCausalLM.from_config(config).eval(), AutoTokenizer.from_pretrained(path)
rng = random.Random(0)
text = lambda n: "".join(rng.choice("abcdefgh ") for _ in range(n))
scorer = CoherenceScorer(micro_batch_size={batch}, hardened=False, activation_checkpointing={checkpointing})
scorer.score(model, tok, [text(8)], [text(6)], [text(3)])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
z, x, y = {length} // 2, {length} * 3 // 8, {length} - {length} // 2 - {length} * 3 // 8 - 2
scorer.score(model, tok, [text(z) for _ in range({batch})], [text(x) for _ in range({batch})],
             [text(y) for _ in range({batch})])
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 / {batch}))
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP/MKL too)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds over the runs")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="steps dropped at the start of each run")
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hiddens", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--memory-length", type=int, default=512, help="tokens per sequence in the memory table")
    parser.add_argument("--memory-batch", type=int, default=8, help="sequences per pass in the memory table")
    parser.add_argument("--memory-only", action="store_true", help="print only the memory table")
    args = parser.parse_args()
    load_before = load_average()
    print_memory_table(args)
    if args.memory_only:
        print(f"command: python benchmarks/scaling.py {' '.join(sys.argv[1:])}")
        print(f"threads: 1 per measurement; {os.cpu_count()} CPUs")
        print(f"1-minute load average: {load_before:.2f} before, {load_average():.2f} after")
        return
    scratch = Path(tempfile.mkdtemp(prefix="cepo-scaling-"))
    try:
        models = {h: random_model(h, scratch / f"hidden{h}") for h in sorted(set(args.hiddens) | {BASE["hidden"]})}
        settings = [dict(BASE)]
        for key, values in (("G", args.groups), ("tokens", args.lengths), ("K", args.ks), ("hidden", args.hiddens)):
            settings += [{**BASE, key: v} for v in values if v != BASE[key]]
        preset = ["--config", str(ROOT / "configs" / "rewards" / "cepo.yaml")]
        arms = {}
        for s in settings:
            name = f"G={s['G']} T={s['tokens']} K={s['K']} h={s['hidden']}"
            arms[name] = preset + [
                "--config", coherence_overlay(s["K"]),
                "--model.init_args.policy.name_or_path", models[s["hidden"]][0],
                "--model.init_args.group_size", str(s["G"]),
                "--model.init_args.generation.max_new_tokens", str(s["tokens"]),
            ]
        pooled = alternate(arms, args.rounds, args.steps, args.warmup, args.threads)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print("| G | new tokens | K | hidden (M params) | s / step | coherence s / step | coherence share | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for s, (name, entry) in zip(settings, pooled.items()):
        step, coherence = median(entry["step_s"]), median(entry["coherence_s"])
        print(f"| {s['G']} | {s['tokens']} | {s['K']} | {s['hidden']} ({models[s['hidden']][1]:.2f}) | {step:.2f} | "
              f"{coherence:.2f} | {coherence / step:.0%} | {entry['peak_rss_mb']:.0f} |")
    print()
    print(f"command: python benchmarks/scaling.py {' '.join(sys.argv[1:])}")
    print(f"16 prompts per step; {args.rounds} round(s) x {args.steps} steps per run after {args.warmup} warm-up; "
          f"threads: {args.threads}; {os.cpu_count()} CPUs")
    print(f"1-minute load average: {load_before:.2f} before, {load_average():.2f} after")


def print_memory_table(args) -> None:
    print(f"| hidden | MB / sequence of {args.memory_length} tokens | with activation checkpointing |")
    print("|---|---|---|")
    for hidden in args.hiddens:
        plain, checkpointed = (memory_per_sequence(hidden, args.memory_length, args.memory_batch, c) for c in (False, True))
        print(f"| {hidden} | {plain:.1f} | {checkpointed:.1f} |", flush=True)
    print(f"(scoring pass: one forward and two VJPs, float32, {args.memory_batch} sequences per pass, 4 layers; "
          "extra peak RSS over a warm process, per sequence)")
    print()


if __name__ == "__main__":
    main()
