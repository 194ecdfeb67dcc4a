"""One GRPO configuration run by cepo and by TRL's ``GRPOTrainer``, side by side, alternating.

Same work for both: the embedded policy (``embedded:tiny-shortcut-llama``), the embedded shortcut task's
training prompts in the quickstart's ``raw`` template, 16 prompts x G = 8 completions per step, 32 new
tokens at temperature 1, LoRA r = 8 / alpha 16 on all linear layers, beta = 0.001 (k3 KL to the
adapter-disabled reference), ``dapo`` aggregation, 64 completions per forward/backward pass, one
optimiser step per rollout, the same accuracy reward (cepo's parser and matcher), no gradient
checkpointing. cepo runs through its CLI on ``configs/quickstart.yaml`` as it is (which sets exactly these
options; validation off); TRL gets the same values from the constants below.

Each block runs ``--steps`` steps in a fresh trainer; blocks alternate cepo, TRL, cepo, TRL, ... and the
time between consecutive step ends is recorded, so model loading and the first (warm-up) step cancel.
Prints the median seconds per step of each, their ratio, the thread count and the load.

    pip install -e '.[bench]'          # TRL
    python benchmarks/trl_compare.py --threads 1 --steps 6 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS, GROUP, NEW_TOKENS, MICRO, LR, BETA, RANK, ALPHA = 16, 8, 32, 64, 2e-3, 0.001, 8, 16


def cepo_block(steps: int, workdir: Path, seed: int) -> tuple[list[float], list[float]]:
    from lightning import Callback

    from cepo.cli import main

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.lengths: list[float] = []

        def on_train_batch_end(self, trainer, *args) -> None:
            self.ends.append(time.perf_counter())
            length = trainer.callback_metrics.get("train/completion/length_mean")
            if length is not None:
                self.lengths.append(float(length))

    timer = StepTimer()
    original = main.__globals__["CEPOCLI"].__init__

    def with_timer(self, *args, trainer_defaults=None, **kwargs):
        # add the timer to the trainer's callbacks without a config file entry
        trainer_defaults = {**(trainer_defaults or {}), "callbacks": [timer]}
        original(self, *args, trainer_defaults=trainer_defaults, **kwargs)

    main.__globals__["CEPOCLI"].__init__ = with_timer
    try:
        main([
            "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
            "--seed_everything", str(seed),
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", str(workdir / "cepo"),
            # everything else as configs/quickstart.yaml sets it: the configuration of this benchmark
        ])
    finally:
        main.__globals__["CEPOCLI"].__init__ = original
    return timer.ends, timer.lengths


def trl_block(steps: int, workdir: Path, seed: int) -> tuple[list[float], list[float]]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from cepo.answers import AnswerParser, resolve_markers
    from cepo.answers.matching import answers_match
    from cepo.data.prompts import render_prompt
    from cepo.data.sources import ShortcutTask
    from cepo.policy.loading import PolicyConfig, load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(PolicyConfig())
    examples = ShortcutTask(split="train", size=4000, cue_rate=0.9).load()
    rows = [{"prompt": render_prompt(ex, family="raw", marker="answer"), "gold": list(ex.gold),
             "answer_kind": ex.answer_kind} for ex in examples]
    parser = AnswerParser(resolve_markers("answer", ["answer", "finalanswer", "boxed", "gsm8k"]))

    def accuracy(prompts, completions, gold, answer_kind, **_):
        return [float(answers_match(parser(text).answer, tuple(g), kind)) for text, g, kind in
                zip(completions, gold, answer_kind)]

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.lengths: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(float(logs["completions/mean_length"]))

    timer = StepTimer()
    config = GRPOConfig(
        output_dir=str(workdir / "trl"), use_cpu=True, bf16=False, fp16=False, seed=seed,
        max_steps=steps, per_device_train_batch_size=MICRO, gradient_accumulation_steps=PROMPTS * GROUP // MICRO,
        num_generations=GROUP, max_completion_length=NEW_TOKENS, temperature=1.0, top_k=0, top_p=1.0,
        beta=BETA, loss_type="dapo", num_iterations=1, epsilon=0.2, scale_rewards="group",
        learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=1.0,
        gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0,
    )
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        model=resolve_model_path("embedded:tiny-shortcut-llama"), reward_funcs=accuracy, args=config,
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora,
        callbacks=[timer],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # per-step metric dicts on stdout
    trainer.train()
    return timer.ends, timer.lengths


def step_times(ends: list[float]) -> list[float]:
    return [b - a for a, b in zip(ends, ends[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the same for both)")
    parser.add_argument("--steps", type=int, default=6, help="steps per block (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating cepo/TRL block pairs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    import trl

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "transformers", "trl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print("command:", " ".join(["python", *sys.argv]))
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {"cepo": [], "trl": []}
    lengths: dict[str, list[float]] = {"cepo": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, block in (("cepo", cepo_block), ("trl", trl_block)):
                ends, lens = block(args.steps, Path(tmp) / f"{name}{round_}", seed=round_)
                times[name] += step_times(ends)
                lengths[name] += lens
                print(f"round {round_} {name}: " + " ".join(f"{t:.2f}" for t in step_times(ends)), flush=True)
    load_after = os.getloadavg()
    print(f"\ntorch {torch.__version__}, trl {trl.__version__}, threads {args.threads}, cores {os.cpu_count()}, "
          f"load (1-min) {load_before[0]:.2f} before / {load_after[0]:.2f} after")
    print(f"{PROMPTS} prompts x G={GROUP}, {NEW_TOKENS} new tokens, LoRA r={RANK} all-linear, beta={BETA}, dapo, "
          f"micro-batch {MICRO}, one optimiser step per rollout")
    print(f"{'trainer':<8}{'median s/step':>15}{'steps timed':>13}{'mean completion length':>24}")
    medians = {}
    for name in times:
        medians[name] = statistics.median(times[name])
        mean_length = statistics.mean(lengths[name]) if lengths[name] else float("nan")
        print(f"{name:<8}{medians[name]:>15.3f}{len(times[name]):>13}{mean_length:>24.1f}")
    print(f"cepo / TRL = {medians['cepo'] / medians['trl']:.2f}")


if __name__ == "__main__":
    main()
