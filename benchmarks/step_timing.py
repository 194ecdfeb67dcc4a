"""Shared harness of the step benchmarks: one training run per subprocess, timed from the inside.

An *arm* is a list of extra ``cepo fit`` arguments on top of ``configs/quickstart.yaml``. Each arm runs
in its own Python process (so its peak resident memory is its own) with validation, checkpoints and the
logger off; the seconds of every ``training_step`` (generate, reward terms, coherence, update) and the
coherence seconds of every rollout are recorded, and the process prints them as one JSON line. Arms are
run in rounds that alternate between them, so that a change in the machine's load hits them alike.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
PHASES = ("generate", "reference", "update")  # per-phase seconds the module logs (update includes reference)


def load_average() -> float:
    """The 1-minute load average (other work on the machine skews timings); NaN where unknown."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def coherence_overlay(k: int, weights: tuple[float, float, float] = (0.1, 0.1, 0.1), **scorer: object) -> str:
    """A YAML overlay that adds the coherence callback with K counterfactuals (the ``cepo`` preset's
    weights by default) and extra scorer options; written to a temporary file, its path returned."""
    init = {"num_counterfactuals": k, **scorer}
    text = json.dumps(
        {
            "trainer": {
                "callbacks": [
                    {
                        "class_path": "cepo.CoherenceRewardCallback",
                        "init_args": {
                            "weight_zx": weights[0], "weight_xy": weights[1], "weight_zy": weights[2],
                            "scorer": {"class_path": "cepo.CoherenceScorer", "init_args": init},
                        },
                    }
                ]
            }
        }
    )
    handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    handle.write(text)  # JSON is YAML
    handle.close()
    return handle.name


def run_arm(args: list[str], steps: int, warmup: int, threads: int, timeout: float = 1800) -> dict:
    """Runs one arm in a subprocess: ``warmup + steps`` training steps; returns the parsed JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads),
               "--steps", str(steps + warmup), "--"] + args
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"arm {args} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1])
    result["step_s"] = result["step_s"][warmup:]
    for key in ("coherence_s", "distinct", "length"):
        result[key] = result[key][warmup:]
    result["phases"] = {key: values[warmup:] for key, values in result["phases"].items()}
    return result


def alternate(arms: dict[str, list[str]], rounds: int, steps: int, warmup: int, threads: int) -> dict[str, dict]:
    """Every arm ``rounds`` times, in alternating order; per arm the pooled step and coherence times and
    the largest peak resident memory of its runs."""
    pooled = {
        name: {"step_s": [], "coherence_s": [], "peak_rss_mb": 0.0, "distinct": [], "length": [],
               "phases": {key: [] for key in PHASES}}
        for name in arms
    }
    for r in range(rounds):
        names = list(arms) if r % 2 == 0 else list(reversed(arms))
        for name in names:
            result = run_arm(arms[name], steps, warmup, threads)
            entry = pooled[name]
            entry["step_s"] += result["step_s"]
            entry["coherence_s"] += result["coherence_s"]
            entry["distinct"] += result["distinct"]
            entry["length"] += result["length"]
            for key in PHASES:
                entry["phases"][key] += result["phases"].get(key, [])
            entry["peak_rss_mb"] = max(entry["peak_rss_mb"], result["peak_rss_mb"])
            print(f"  round {r + 1}, {name}: median step {statistics.median(result['step_s']):.3f} s", flush=True)
    return pooled


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------- inside the subprocess


def _child(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    split = argv.index("--")
    opts, extra = parser.parse_args(argv[:split]), argv[split + 1 :]
    import torch

    torch.set_num_threads(opts.threads)
    from cepo.cli import main
    from cepo.training.module import CEPOModule

    step_s: list[float] = []
    coherence_s: list[float] = []
    distinct: list[float] = []
    phases: dict[str, list[float]] = {}
    lengths: list[float] = []
    training_step = CEPOModule.training_step
    log_rollout = CEPOModule.log_rollout

    def timed_step(self, batch, batch_idx):
        start = time.perf_counter()
        out = training_step(self, batch, batch_idx)
        step_s.append(time.perf_counter() - start)
        return out

    def recorded(self, rollout, stats, *args, **kwargs):
        coherence_s.append(float(rollout.stats.get("time/coherence_s", 0.0)))
        for key in PHASES:
            phases.setdefault(key, []).append(float(stats.get(f"time/{key}_s", rollout.stats.get(f"time/{key}_s", 0.0))))
        lengths.append(float(rollout.completion_mask.float().sum(-1).mean()))
        duplicate = rollout.stats.get("coherence/duplicate")
        distinct.append(float("nan") if duplicate is None else 1.0 - float(duplicate))
        return log_rollout(self, rollout, stats, *args, **kwargs)

    CEPOModule.training_step = timed_step
    CEPOModule.log_rollout = recorded
    args = ["fit", "--config", str(QUICKSTART)] + extra + [
        "--trainer.max_steps", str(opts.steps), "--trainer.logger", "false", "--trainer.default_root_dir",
        tempfile.mkdtemp(prefix="cepo-bench-"), "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]
    root = args[args.index("--trainer.default_root_dir") + 1]
    main(args)
    shutil.rmtree(root, ignore_errors=True)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    print(json.dumps({"step_s": step_s, "coherence_s": coherence_s, "distinct": distinct, "phases": phases,
                      "length": lengths, "peak_rss_mb": peak_kb / 1024}))


if __name__ == "__main__":
    _child(sys.argv[1:])
