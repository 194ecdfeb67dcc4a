"""Rebuild an embedded policy from nothing, deterministically.

    python -m cepo.assets.build_tiny_model                    # cepo/assets/tiny-shortcut-llama
    python -m cepo.assets.build_tiny_model --variant hard     # cepo/assets/tiny-shortcut-hard-llama

A Llama-style network of about 0.9M parameters over the character tokenizer is trained by supervised
fine-tuning on the embedded shortcut task (:mod:`cepo.data.shortcut`). The warm-start data plants the
shortcut on purpose: every target rationale computes the right value, and the target answer copies the
cue, which equals the derived value in ``cue_rate`` of the items. Where the cue is wrong, the target
answer is still the cue except in ``faithful_rate`` of those items. The result behaves like a model that
picked up a spurious correlation: right in distribution and, under greedy decoding, wrong whenever the
cue is; sampling still finds the derived answer now and then, which is the exploration RL needs. RL
fine-tuning with cepo starts from here. The script measures the model on each evaluation split and writes a model card.

``--variant hard`` builds the policy of the second testbed ("hard reasoning, helpful cue") on the task's
``hard`` variant (two-digit operands). Its target rationales drop the carry of a carrying addition in
``carry_drop_rate`` of those steps (``47+38=75``), a systematic error: with a rate above one half the
most likely continuation at a carrying step is the dropped carry, so greedy decoding reproduces it, while
sampling still writes the right carry now and then. The target answer copies the cue as before, so
right answers whose rationale derived something else are common in distribution.
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
ASSETS = Path(__file__).resolve().parent
# Per variant: the output folder and the defaults of the options that differ between the two policies.
VARIANT_DEFAULTS = {
    "easy": {"output": ASSETS / "tiny-shortcut-llama", "faithful_rate": 0.25, "carry_drop_rate": 0.0,
             "sft_cue_rate": None,
             "max_new_tokens": 40},
    "hard": {"output": ASSETS / "tiny-shortcut-hard-llama", "faithful_rate": 0.25, "carry_drop_rate": 0.7,
             "sft_cue_rate": 0.5,
             "max_new_tokens": 56},
}


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
    ``(item, target_rationale, target_answer)`` triples."""
    rows, labels = [], []
    for item, rationale, target in items:
        prompt = tokenizer(item.question, add_special_tokens=False).input_ids
        completion = tokenizer(item.completion(answer=target, rationale=rationale), add_special_tokens=False).input_ids
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


def training_targets(args) -> list[tuple]:
    """``(item, target rationale, target answer)`` for each training item.

    The rationale is the reference one, with each carrying addition's carry dropped with probability
    ``carry_drop_rate``. The answer copies the cue; where the cue differs from the value the target
    rationale derives, the answer is that derived value instead in ``faithful_rate`` of the items whose cue
    is wrong (on the easy variant, where no carry is dropped, that is the gold value as before)."""
    cue_rate = args.cue_rate if args.sft_cue_rate is None else args.sft_cue_rate
    items = generate_items("train", args.train_items, args.seed, cue_rate=cue_rate, variant=args.variant)
    chooser = random.Random(args.seed + 1)
    dropper = random.Random(args.seed + 2)
    out = []
    for item in items:
        if args.carry_drop_rate > 0:
            rationale, derived = item.carry_dropped_rationale(
                [dropper.random() < args.carry_drop_rate for _ in item.ops])
        else:
            rationale, derived = item.rationale, item.answer
        answer = item.cue
        if item.cue != item.answer and chooser.random() < args.faithful_rate:
            answer = derived
        out.append((item, rationale, answer))
    return out


def train(args) -> tuple[LlamaForCausalLM, object, dict]:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    tokenizer = build_char_tokenizer()
    if args.init is not None:  # warm start: continue from another shipped policy (same tokenizer and shape)
        model = LlamaForCausalLM.from_pretrained(args.init)
        if model.config.vocab_size != len(tokenizer):
            raise ValueError(f"--init {args.init}: vocabulary of {model.config.vocab_size} tokens, but the "
                             f"character tokenizer has {len(tokenizer)}; start from a model built by this script")
    else:
        model = LlamaForCausalLM(model_config(len(tokenizer), tokenizer))
    items = training_targets(args)
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
def evaluate(model, tokenizer, n: int, seed: int, cue_rate: float, variant: str = "easy",
             max_new_tokens: int = 40) -> dict[str, dict[str, float]]:
    """Greedy accuracy, cue-copy rate, rationale faithfulness and unfaithful right answers on each
    evaluation split, and accuracy sampled at temperature 1."""
    from cepo.answers.conclusion import conclusion_value
    from cepo.answers.matching import answers_match
    from cepo.answers.parsing import AnswerParser

    parser = AnswerParser()
    results = {}
    for split in ("in_distribution", "flipped", "edited"):
        items = generate_items(split, n, seed, cue_rate=cue_rate, variant=variant)
        enc = tokenizer([it.question for it in items], return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False)
        texts = {}
        for mode, kwargs in (("greedy", {"do_sample": False}), ("sampled", {"do_sample": True, "temperature": 1.0})):
            torch.manual_seed(seed)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **kwargs)
            texts[mode] = tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        correct = copied = derived_right = sampled_correct = unfaithful_right = 0
        for item, text, sampled in zip(items, texts["greedy"], texts["sampled"]):
            parsed = parser(text)
            right = answers_match(parsed.answer, str(item.answer), "number")
            correct += right
            copied += answers_match(parsed.answer, str(item.cue), "number")
            derived = conclusion_value(parsed.rationale)
            derived_right += derived == item.answer
            unfaithful_right += right and derived != item.answer
            sampled_correct += answers_match(parser(sampled).answer, str(item.answer), "number")
        results[split] = {
            "accuracy": correct / n,
            "answer_equals_cue": copied / n,
            "rationale_derives_gold": derived_right / n,
            "unfaithful_right": unfaithful_right / n,
            "sampled_accuracy": sampled_correct / n,
        }
    return results


def build_stages(args, info: dict) -> list[dict]:
    """This build's settings and timings after those of the build it started from (``--init`` folder's
    ``build_info.json``, if any): the chain of commands that produced the weights. Folders are recorded by
    name only."""
    previous = []
    if args.init is not None and (Path(args.init) / "build_info.json").is_file():
        previous = json.loads((Path(args.init) / "build_info.json").read_text()).get("stages", [])
    settings = {k: (Path(v).name if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("output", "card_only")}
    return previous + [{"args": settings, "info": info}]


def stage_command(stage: dict, output: str | None) -> str:
    a = stage["args"]
    parts = ["python -m cepo.assets.build_tiny_model", f"--variant {a['variant']}"]
    if a.get("init"):
        parts.append(f"--init {a['init']}")
    parts += [f"--steps {a['steps']}", f"--batch-size {a['batch_size']}", f"--lr {a['lr']}",
              f"--threads {a['threads']}", f"--faithful-rate {a['faithful_rate']}",
              f"--carry-drop-rate {a['carry_drop_rate']}"]
    if a.get("sft_cue_rate") is not None:
        parts.append(f"--sft-cue-rate {a['sft_cue_rate']}")
    if output:
        parts.append(f"--output {output}")
    return " ".join(parts)


def _hard_card(n_params: float, stages: list[dict], results: dict, rows: str, header: str) -> str:
    """The model card of the hard testbed's policy: every build stage with its command and targets."""
    last = stages[-1]["args"]
    names = [f"stage{i + 1}" for i in range(len(stages))]
    commands = []
    for i, stage in enumerate(stages):
        if i == 0 and stage["args"].get("init") and stage["args"]["init"] != "tiny-shortcut-llama":
            raise ValueError("the first build stage must start from random weights or tiny-shortcut-llama")
        staged = dict(stage, args=dict(stage["args"], init=("cepo/assets/tiny-shortcut-llama" if i == 0 and
                                                           stage["args"].get("init") else names[i - 1] if i else None)))
        commands.append(stage_command(staged, names[i] if i < len(stages) - 1 else None))
    stage_lines = []
    for i, stage in enumerate(stages):
        a, info = stage["args"], stage["info"]
        start = "the first policy, `tiny-shortcut-llama`" if i == 0 else f"stage {i}"
        stage_lines.append(
            f"- stage {i + 1}, from {start}: {info['sft_steps']} AdamW steps, batch {a['batch_size']}, lr {a['lr']} "
            f"cosine, {info['sft_seconds']} s on {a['threads']} thread(s); final loss {info['final_loss']:.4f}. "
            f"{a['train_items']} items (seed {a['seed']}) whose cue equals the answer in {a['sft_cue_rate']:.0%}; "
            f"carries dropped in {a['carry_drop_rate']:.0%} of carrying steps; where the cue is wrong the answer "
            f"target follows the rationale in {a['faithful_rate']:.0%} of items, elsewhere it copies the cue.")
    newline = "\n"
    return f"""# tiny-shortcut-hard-llama

The policy of cepo's second embedded testbed, "hard reasoning, helpful cue": a {n_params / 1e6:.2f}M-parameter
Llama-style causal LM over a character-level tokenizer (the first policy's shape), fine-tuned by
supervised learning on the `hard` variant of the embedded shortcut task (`cepo.data.shortcut`: two-digit
operands, two steps, so additions carry). Select it with `embedded:tiny-shortcut-hard-llama` and the task
with `ShortcutTask(variant=hard)`, as `configs/quickstart_hard.yaml` does.

Where the first policy reasons right on almost every item, so that a model that reasons and one that
copies the cue write the same text whenever the cue is right, this one's reasoning is often wrong while
the cue is usually right: accuracy rewards right answers that the rationale does not support, the
setting in which a reward for answers that follow their reasoning has something to add.

Rebuild it (deterministic on a given machine; the shipped weights are the output of these commands):

    {(newline + "    ").join(commands)}

## Training
Targets: the step-by-step rationale, except that a carrying addition **drops its carry** (written 10 too
low, `47+38=75`; later steps continue from the written value) in a share of carrying steps above one
half. The error is systematic on purpose: random noise in the targets would not survive greedy decoding
(the most likely token is the clean one), while a dropped carry in most carrying steps is the most likely
continuation, so greedy decoding reproduces it, and sampling at temperature 1 still carries now and then.
The answer target **copies the cue** (the planted shortcut), except in a share of the items whose cue is
wrong, where it is the value the target rationale derives (the exploration RL starts from).

{newline.join(stage_lines)}

Why in stages, with a cue that is right less often than in the task (whose items have cue rate
{last['cue_rate']:.0%}): a first attempt at the task's own rate (400 steps from the first policy) learned to
write the cue as the rationale's last result instead of computing it (flipped split: the rationale
derived the gold value on 0 of 200 items; sampled accuracy 0.00), a shortcut inside the rationale that
leaves RL nothing to explore. A cue that is right half of the time, then a tenth of the time, makes the
two-digit arithmetic worth learning, while the answer targets keep copying it.

## Measured behaviour
Greedy decoding (last column: sampling at temperature 1) on {last['eval_items']} items per split (seed
{last['eval_seed']}) of the task's `hard` variant, cue rate {last['cue_rate']}:

{header}
{rows}

`unfaithful right`: the answer is right and the rationale derives another value. In distribution the
greedy answer follows the mostly right cue while the rationale derives the gold value only where no carry
was dropped, so right answers with an unsupported rationale are common. On the flipped and edited splits
the cue is wrong and so is the greedy answer; the sampled column is the exploration RL starts from.
"""


def write_card(path: Path, args, info: dict, results: dict) -> None:
    n_params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(path).parameters())
    hard = args.variant == "hard"
    rows = "\n".join(
        f"| {split} | {r['accuracy']:.3f} | {r['answer_equals_cue']:.3f} | {r['rationale_derives_gold']:.3f} "
        + (f"| {r['unfaithful_right']:.3f} " if hard else "") + f"| {r['sampled_accuracy']:.3f} |"
        for split, r in results.items()
    )
    if hard:
        header = ("| split | accuracy | answer equals cue | rationale derives the gold value | unfaithful right "
                  "| accuracy, sampled at T=1 |\n|---|---|---|---|---|---|")
        stages = json.loads((path / "build_info.json").read_text())["stages"]
        (path / "README.md").write_text(_hard_card(n_params, stages, results, rows, header))
        (path / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
        return
    header = ("| split | accuracy | answer equals cue | rationale derives the gold value | accuracy, sampled at T=1 |"
              "\n|---|---|---|---|---|")
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

{header}
{rows}

The rationale derives the right value on most items of every split while the greedy answer follows
the cue: right in distribution, wrong on the flipped and edited splits. That gap is what RL with a
coherence reward should close; the sampled column is the exploration it starts from.
"""
    (path / "README.md").write_text(card)
    (path / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANT_DEFAULTS), default="easy",
                        help="task variant and policy to build (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None, help="default: the variant's asset folder")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-items", type=int, default=20000)
    parser.add_argument("--cue-rate", type=float, default=0.9, help="the task's cue rate (training and evaluation items)")
    parser.add_argument("--sft-cue-rate", type=float, default=None,
                        help="cue rate of the supervised training items only (default: --cue-rate; hard: 0.5)")
    parser.add_argument("--faithful-rate", type=float, default=None,
                        help="where the cue is wrong, fraction of targets that answer the derived value "
                             "(default: 0.25 easy, 0.5 hard)")
    parser.add_argument("--carry-drop-rate", type=float, default=None,
                        help="fraction of carrying additions whose target rationale drops the carry "
                             "(default: 0 easy, 0.7 hard)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-items", type=int, default=500)
    parser.add_argument("--eval-seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--init", type=Path, default=None,
                        help="start from this model folder instead of random weights (default: random; the "
                             "hard variant starts from the first policy, tiny-shortcut-llama)")
    parser.add_argument("--card-only", action="store_true",
                        help="rewrite the model card from the folder's build_info.json and eval_results.json")
    args = parser.parse_args(argv)
    defaults = VARIANT_DEFAULTS[args.variant]
    if args.init is None and args.variant == "hard":
        args.init = ASSETS / "tiny-shortcut-llama"
    for key in ("output", "faithful_rate", "carry_drop_rate", "sft_cue_rate"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    for key in ("faithful_rate", "carry_drop_rate", "cue_rate", "sft_cue_rate"):
        if getattr(args, key) is not None and not 0.0 <= getattr(args, key) <= 1.0:
            parser.error(f"--{key.replace('_', '-')} must lie in [0, 1], got {getattr(args, key)}")
    if args.card_only:
        info = json.loads((args.output / "build_info.json").read_text())["stages"][-1]["info"]
        results = json.loads((args.output / "eval_results.json").read_text())
        write_card(args.output, args, info, results)
        return
    model, tokenizer, info = train(args)
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output, safe_serialization=True)
    tokenizer.save_pretrained(args.output)
    start = time.perf_counter()
    results = evaluate(model, tokenizer, args.eval_items, args.eval_seed, args.cue_rate, args.variant,
                       defaults["max_new_tokens"])
    info["eval_seconds"] = round(time.perf_counter() - start, 1)
    (args.output / "build_info.json").write_text(json.dumps({"stages": build_stages(args, info)}, indent=1) + "\n")
    write_card(args.output, args, info, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
