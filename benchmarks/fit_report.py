"""Per-step seconds, tokens per second and peak memory of a ``cepo fit`` run, and the results file of
``benchmarks/gpu_run.sh``.

``FitReport`` is a Lightning callback (``benchmarks/`` on ``PYTHONPATH``): after every training step it
records the step's phase times as the module logged them (``train/time/*``), its completion tokens and
the step's peak memory (peak allocated GPU memory, or on the CPU the rise of the resident peak), and when
training ends the coherence scorer's micro-batch (with ``micro_batch_size: auto``, the size the halving
settled on). It writes them to ``path`` as JSON.

    python benchmarks/fit_report.py --summary OUT     # OUT/gpu_step.json + OUT/fit.json -> OUT/results.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from lightning import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_step import PeakMemory  # noqa: E402

PHASES = ("generate_s", "score_s", "coherence_s", "reference_s", "update_s", "step_s")


class FitReport(Callback):
    """Writes each training step's phase seconds, tokens per second and peak memory to ``path`` (JSON)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.steps: list[dict] = []
        self.memory: PeakMemory | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.memory = PeakMemory(pl_module.device)
        self.memory.reset()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        row = {name: metrics.get(f"train/time/{name}") for name in PHASES}
        rows = len(batch) * pl_module.group_size if hasattr(batch, "__len__") else None
        length = metrics.get("train/completion/length_mean")
        row["rollouts"] = rows
        row["completion_tokens"] = None if rows is None or length is None else rows * length
        if row["completion_tokens"] and row["step_s"]:
            row["tokens_per_s"] = row["completion_tokens"] / row["step_s"]
        row["peak_gb"] = self.memory.peak_gb() if self.memory else None
        self.steps.append(row)

    def on_train_end(self, trainer, pl_module) -> None:
        scorers = [getattr(cb, "scorer", None) for cb in trainer.callbacks]
        scorer = next((s for s in scorers if s is not None), None)
        report = {
            "device": str(pl_module.device),
            "device_name": torch.cuda.get_device_name(pl_module.device) if pl_module.device.type == "cuda" else "cpu",
            "precision": str(trainer.precision),
            "steps": self.steps,
            "scorer_micro_batch_size": None if scorer is None else scorer.micro_batch_size,
            # with "auto": the size that fitted (the halving keeps it for later calls)
            "scorer_micro_batch_found": None if scorer is None else scorer._auto_size,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(report, indent=2) + "\n")


def summary(out: Path) -> list[str]:
    """The results of a ``gpu_run.sh`` run as Markdown lines; also writes ``out/results.json``."""
    step = json.loads((out / "gpu_step.json").read_text())
    fit = json.loads((out / "fit.json").read_text())
    lines = [f"## benchmarks/gpu_step.py: {step['device_name']}, {step['shape']} shape, {step['dtype']}",
             "", f"`{step['command']}`", "", "| phase | seconds | peak GB |", "|---|---|---|"]
    for name, phase in step["phases"].items():
        lines.append(f"| {name} | {phase['seconds']:.2f} | {phase['peak_gb']:.2f} |")
    lines += ["", f"generation {step['generate_tokens_per_s']:.0f} tokens/s, step {step['step_tokens_per_s']:.0f} "
              f"completion tokens/s; largest coherence micro-batch {step['largest_micro_batch']} "
              f"({step['probe_limit']})", "",
              f"## cepo fit: {fit['device_name']}, precision {fit['precision']}", "",
              "| step | generate s | score s (coherence s) | reference s | update s | step s | tokens/s | peak GB |",
              "|---|---|---|---|---|---|---|---|"]

    def cell(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    for i, row in enumerate(fit["steps"]):
        lines.append(f"| {i} | {cell(row['generate_s'])} | {cell(row['score_s'])} ({cell(row['coherence_s'])}) | "
                     f"{cell(row['reference_s'])} | {cell(row['update_s'])} | {cell(row['step_s'])} | "
                     f"{cell(row.get('tokens_per_s'), 0)} | {cell(row['peak_gb'])} |")
    lines += ["", f"scorer.micro_batch_size {fit['scorer_micro_batch_size']}: "
              f"{fit['scorer_micro_batch_found']} sequences per pass fitted"]
    (out / "results.json").write_text(json.dumps({"gpu_step": step, "fit": fit}, indent=2) + "\n")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summary", type=Path, required=True, metavar="OUT", help="the folder gpu_run.sh wrote")
    args = parser.parse_args()
    text = "\n".join(summary(args.summary)) + "\n"
    (args.summary / "results.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
