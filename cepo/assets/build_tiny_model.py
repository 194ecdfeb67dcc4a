"""Rebuild the embedded policy ``cepo/assets/tiny-shortcut-llama`` from nothing, deterministically.

    python -m cepo.assets.build_tiny_model            # about two minutes on two CPU cores

A Llama-style network of about 0.9M parameters over the character tokenizer is trained by supervised
fine-tuning on the embedded shortcut task (:mod:`cepo.data.shortcut`). The warm-start data plants the
shortcut on purpose: every target rationale computes the right value, and the target answer copies the
cue, which equals the derived value in ``cue_rate`` of the items. Where the cue is wrong, the target
answer is still the cue except in ``faithful_rate`` of those items. The result behaves like a model that
picked up a spurious correlation: right in distribution and, under greedy decoding, wrong whenever the
cue is; sampling still finds the derived answer now and then, which is the exploration RL needs. RL
fine-tuning with cepo starts from here. The script measures the model on each evaluation split and writes a model card.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cepo.data.shortcut import generate_items
from cepo.policy.tokenizer import build_char_tokenizer

ASSET_DIR = Path(__file__).resolve().parent / "tiny-shortcut-llama"


def model_config(vocab_size: int, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def sft_batch(items, tokenizer, device):
    """Token ids with the loss on completion tokens only (rationale, answer, EOS); items are
    ``(item, target_answer)`` pairs."""
    rows, labels = [], []
    for item, target in items:
        prompt = tokenizer(item.question, add_special_tokens=False).input_ids
        completion = tokenizer(item.completion(answer=target), add_special_tokens=False).input_ids
        completion = completion + [tokenizer.eos_token_id]
        rows.append(prompt + completion)
        labels.append([-100] * len(prompt) + completion)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    lab = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device), lab.to(device)


def train(args) -> tuple[LlamaForCausalLM, object, dict]:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    tokenizer = build_char_tokenizer()
    model = LlamaForCausalLM(model_config(len(tokenizer), tokenizer))
    items = generate_items("train", args.train_items, args.seed, cue_rate=args.cue_rate)
    chooser = random.Random(args.seed + 1)
    items = [
        (item, item.answer if item.cue != item.answer and chooser.random() < args.faithful_rate else item.cue)
        for item in items
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    rng = random.Random(args.seed)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        batch = rng.sample(items, args.batch_size)
        ids, mask, labels = sft_batch(batch, tokenizer, "cpu")
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s", flush=True)
    info = {"sft_steps": args.steps, "sft_seconds": round(time.perf_counter() - start, 1), "final_loss": loss.item()}
    return model.eval(), tokenizer, info


@torch.no_grad()
def evaluate(model, tokenizer, n: int, seed: int, cue_rate: float) -> dict[str, dict[str, float]]:
    """Greedy accuracy, cue-copy rate and rationale faithfulness on each evaluation split."""
    from cepo.answers.conclusion import conclusion_value
    from cepo.answers.matching import answers_match
    from cepo.answers.parsing import AnswerParser

    parser = AnswerParser()
    results = {}
    for split in ("in_distribution", "flipped", "edited"):
        items = generate_items(split, n, seed, cue_rate=cue_rate)
        enc = tokenizer([it.question for it in items], return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False)
        texts = {}
        for mode, kwargs in (("greedy", {"do_sample": False}), ("sampled", {"do_sample": True, "temperature": 1.0})):
            torch.manual_seed(seed)
            out = model.generate(**enc, max_new_tokens=40, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **kwargs)
            texts[mode] = tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        correct = copied = derived_right = sampled_correct = 0
        for item, text, sampled in zip(items, texts["greedy"], texts["sampled"]):
            parsed = parser(text)
            correct += answers_match(parsed.answer, str(item.answer), "number")
            copied += answers_match(parsed.answer, str(item.cue), "number")
            derived_right += conclusion_value(parsed.rationale) == item.answer
            sampled_correct += answers_match(parser(sampled).answer, str(item.answer), "number")
        results[split] = {
            "accuracy": correct / n,
            "answer_equals_cue": copied / n,
            "rationale_derives_gold": derived_right / n,
            "sampled_accuracy": sampled_correct / n,
        }
    return results


def write_card(path: Path, args, info: dict, results: dict) -> None:
    n_params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(path).parameters())
    rows = "\n".join(
        f"| {split} | {r['accuracy']:.3f} | {r['answer_equals_cue']:.3f} | {r['rationale_derives_gold']:.3f} "
        f"| {r['sampled_accuracy']:.3f} |"
        for split, r in results.items()
    )
    card = f"""# tiny-shortcut-llama

The embedded policy of cepo: a {n_params / 1e6:.2f}M-parameter Llama-style causal LM over a character-level
tokenizer, warm-started by supervised fine-tuning on the embedded shortcut task
(`cepo.data.shortcut`). It exists so that cepo runs end to end on a CPU with no download, and so that
the shortcut the method is meant to remove is really there.

Rebuild it (deterministic on a given machine; about two minutes on two CPU cores):

    python -m cepo.assets.build_tiny_model

## Training
- data: {args.train_items} generated training items (seed {args.seed}, cue rate {args.cue_rate});
  targets are the step-by-step rationale and an answer that **copies the cue** (the planted shortcut),
  except that where the cue is wrong the target is the derived value in {args.faithful_rate:.0%} of items
- {info['sft_steps']} AdamW steps, batch {args.batch_size}, lr {args.lr} cosine, {info['sft_seconds']} s;
  final loss {info['final_loss']:.4f}

## Measured behaviour
Greedy decoding (last column: sampling at temperature 1) on {args.eval_items} items per split (seed
{args.eval_seed}), written by the build script:

| split | accuracy | answer equals cue | rationale derives the gold value | accuracy, sampled at T=1 |
|---|---|---|---|---|
{rows}

The rationale derives the right value on most items of every split while the greedy answer follows
the cue: right in distribution, wrong on the flipped and edited splits. That gap is what RL with a
coherence reward should close; the sampled column is the exploration it starts from.
"""
    (path / "README.md").write_text(card)
    (path / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=ASSET_DIR)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-items", type=int, default=20000)
    parser.add_argument("--cue-rate", type=float, default=0.9)
    parser.add_argument("--faithful-rate", type=float, default=0.25,
                        help="where the cue is wrong, fraction of targets that answer the derived value")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-items", type=int, default=500)
    parser.add_argument("--eval-seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    model, tokenizer, info = train(args)
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output, safe_serialization=True)
    tokenizer.save_pretrained(args.output)
    results = evaluate(model, tokenizer, args.eval_items, args.eval_seed, args.cue_rate)
    write_card(args.output, args, info, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
