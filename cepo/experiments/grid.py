"""Run the reward experiment grid and write its results table (markdown and JSON).

    python -m cepo.experiments.grid                          # the full grid of configs/experiments/grid.yaml
    python -m cepo.experiments.grid --jobs 2                 # two runs at a time (one per core)
    python -m cepo.experiments.grid --arms accuracy_only,cepo --seeds 0,1
    python -m cepo.experiments.grid --reduced --out runs/grid_reduced     # toy size, about a minute
    python -m cepo.experiments.grid --table-only             # rebuild the table from finished runs

Each run is a ``cepo fit`` subprocess writing ``<out>/runs/<arm>/seed<S>/``; a finished run leaves
``done.json`` (its wall time and command) and is skipped on the next call, so an interrupted grid resumes
where it stopped (an unfinished run is started again from scratch). The untrained policy is evaluated
once with ``cepo validate`` as the ``start`` row. The table reads each run's last validation from
``val_results.jsonl`` and ``val_diagnostics.jsonl`` and the training curves from its TensorBoard events,
and reports mean +- std over seeds per arm: ``<out>/results.md`` and ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_GRID = "configs/experiments/grid.yaml"
SPLITS = ("in_distribution", "flipped", "edited")
# Training curves summarised over the last quarter of the steps.
TRAIN_TAGS = {
    "reward": "train/reward_mean",
    "zero_std_groups": "train/zero_std_groups",
    "coherence_zx": "train/rewards/coherence_zx_mean",
    "coherence_xy": "train/rewards/coherence_xy_mean",
    "coherence_zy": "train/rewards/coherence_zy_mean",
    "coherence_do": "train/rewards/coherence_do_mean",
}
DIAGNOSTIC_CHANNELS = ("xy", "zy", "do", "fused", "fused_same_accuracy")


@dataclass
class Run:
    arm: str
    seed: int | None  # None: the untrained start, evaluated once
    command: list[str]
    directory: Path

    @property
    def name(self) -> str:
        return self.arm if self.seed is None else f"{self.arm}/seed{self.seed}"


@dataclass
class Grid:
    base: list[str]
    last: list[str]
    seeds: list[int]
    start: list[str]
    arms: dict[str, dict]
    extra_args: list[str] = field(default_factory=list)


def load_grid(path: str | Path, reduced: bool = False) -> Grid:
    spec = yaml.safe_load(Path(path).read_text())
    for key in ("base", "seeds", "arms"):
        if key not in spec:
            raise ValueError(f"{path}: the grid needs a `{key}` entry")
    arms = spec["arms"]
    for name, arm in arms.items():
        if "same_as" in arm and arm["same_as"] not in arms:
            raise ValueError(f"{path}: arm {name!r} is the same as {arm['same_as']!r}, which is not an arm")
        if "same_as" not in arm and not arm.get("configs"):
            raise ValueError(f"{path}: arm {name!r} needs `configs` (a list of overlay files) or `same_as`")
    grid = Grid(list(spec["base"]), list(spec.get("last", [])), list(spec["seeds"]), list(spec.get("start", [])), arms)
    if reduced:
        small = spec.get("reduced", {})
        grid.seeds = list(small.get("seeds", grid.seeds))
        grid.extra_args = list(small.get("args", []))
    return grid


def plan(grid: Grid, out: Path, arms: list[str] | None = None, seeds: list[int] | None = None) -> list[Run]:
    """The ``cepo`` commands of the grid: the start evaluation, then every (arm, seed)."""
    chosen = arms or list(grid.arms)
    unknown = sorted(set(chosen) - set(grid.arms))
    if unknown:
        raise ValueError(f"unknown arms {unknown}; the grid has {list(grid.arms)}")
    runs_dir = out / "runs"
    cepo = [sys.executable, "-m", "cepo"]

    def configs(files: list[str]) -> list[str]:
        return [arg for f in files for arg in ("--config", f)]

    def logger(arm: str, version: str) -> list[str]:
        return [f"--trainer.logger.init_args.save_dir={runs_dir}", f"--trainer.logger.init_args.name={arm}",
                f"--trainer.logger.init_args.version={version}"]

    runs = [Run("start", None, [*cepo, "validate", *configs(grid.base + grid.start + grid.last),
                                *grid.extra_args, *logger("start", "untrained")], runs_dir / "start" / "untrained")]
    for arm in chosen:
        spec = grid.arms[arm]
        if "same_as" in spec:
            continue
        for seed in seeds or grid.seeds:
            command = [*cepo, "fit", *configs(grid.base + spec["configs"] + grid.last), *grid.extra_args,
                       *spec.get("args", []), f"--seed_everything={seed}", f"--data.seed={seed}",
                       *logger(arm, f"seed{seed}")]
            runs.append(Run(arm, seed, command, runs_dir / arm / f"seed{seed}"))
    return runs


def execute(run: Run, threads: int) -> dict:
    """Run one command unless it finished before; returns its ``done.json`` record."""
    done = run.directory / "done.json"
    if done.exists():
        print(f"[grid] skip {run.name} (finished)", flush=True)
        return json.loads(done.read_text())
    if run.directory.exists():  # an interrupted run: start it again from scratch
        shutil.rmtree(run.directory)
    run.directory.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    print(f"[grid] run  {run.name}", flush=True)
    start = time.perf_counter()
    with (run.directory / "stdout.log").open("w") as log:
        code = subprocess.call(run.command, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    if code != 0:
        tail = (run.directory / "stdout.log").read_text()[-3000:]
        raise RuntimeError(f"{run.name} failed with exit status {code}:\n{tail}")
    record = {"arm": run.arm, "seed": run.seed, "wall_s": seconds, "command": run.command}
    done.write_text(json.dumps(record, indent=1))
    print(f"[grid] done {run.name} in {seconds:.0f} s", flush=True)
    return record


# ---------------------------------------------------------------------- reading one run


def _last_lines(path: Path) -> list[dict]:
    """The lines of a results JSONL written at its highest rollout step."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return []
    last = max(r["rollout_step"] for r in rows)
    return [r for r in rows if r["rollout_step"] == last]


def train_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{name: [(step, value), ...]}`` of the scalars in ``TRAIN_TAGS`` from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    return {name: [(e.step, e.value) for e in acc.Scalars(tag)] for name, tag in TRAIN_TAGS.items() if tag in tags}


def run_metrics(run_dir: Path) -> dict[str, float]:
    """Flat metrics of one finished run (its last validation and the end of its training curves)."""
    out: dict[str, float] = {}
    for row in _last_lines(run_dir / "val_results.jsonl"):
        split = row["dataset"]
        for key in ("accuracy", "faithful_rate", "cue_copy_rate", "unfaithful_right_rate"):
            if key in row and row[key] is not None:
                out[f"{split}/{key}"] = row[key]
    for row in _last_lines(run_dir / "val_diagnostics.jsonl"):
        base = f"diag/{row['pairs']}/{row['network']}/{row['channel']}"
        out[f"{base}/auc"], out[f"{base}/mean_diff"] = row["auc"], row["mean_diff"]
    for name, points in train_curves(run_dir).items():
        tail = points[-max(1, len(points) // 4):]
        out[f"train/{name}"] = sum(v for _, v in tail) / len(tail)
    done = run_dir / "done.json"
    if done.exists():
        out["wall_s"] = json.loads(done.read_text())["wall_s"]
    return out


# ---------------------------------------------------------------------- the table


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarize(per_run: dict[str, list[dict[str, float]]]) -> dict[str, dict]:
    """``{arm: {"n": seeds, metric: [mean, std]}}`` over the runs of each arm."""
    out = {}
    for arm, runs in per_run.items():
        keys = list(dict.fromkeys(k for r in runs for k in r))
        out[arm] = {"n": len(runs), **{k: list(mean_std([r.get(k, float("nan")) for r in runs])) for k in keys}}
    return out


def _cell(summary: dict, key: str, digits: int = 3) -> str:
    value = summary.get(key)
    if value is None or math.isnan(value[0]):
        return "-"
    mean, std = value
    return f"{mean:.{digits}f}" if summary["n"] == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(summary: dict[str, dict], aliases: dict[str, str], meta: dict) -> str:
    rows = list(summary) + [a for a in aliases]
    lines = [f"# Reward experiment grid", "", f"{meta['description']}", ""]
    main_cols = [("acc ID", "in_distribution/accuracy"), ("acc flipped", "flipped/accuracy"),
                 ("acc edited", "edited/accuracy"), ("faithful flipped", "flipped/faithful_rate"),
                 ("faithful edited", "edited/faithful_rate"), ("cue copy flipped", "flipped/cue_copy_rate"),
                 ("cue copy edited", "edited/cue_copy_rate"),
                 ("unfaithful-right ID", "in_distribution/unfaithful_right_rate"),
                 ("zero-std groups", "train/zero_std_groups"), ("wall s", "wall_s")]
    lines += ["## Accuracy and faithfulness at the last validation (mean ± std over seeds)", "",
              "| arm | seeds | " + " | ".join(c for c, _ in main_cols) + " |", "|---" * (len(main_cols) + 2) + "|"]
    for arm in rows:
        s = summary[aliases.get(arm, arm)]
        label = arm if arm not in aliases else f"{arm} (= {aliases[arm]})"
        lines.append(f"| {label} | {s['n']} | " + " | ".join(
            _cell(s, k, 0 if k == "wall_s" else 3) for _, k in main_cols) + " |")
    pair_sets = sorted({k.split("/")[1] + "/" + k.split("/")[2] for s in summary.values() for k in s
                        if k.startswith("diag/")})
    for network in ("policy", "reference"):
        lines += ["", f"## Reward diagnostics on the {network} network: pairwise AUC (share of pairs where the "
                  "faithful completion scores higher; 0.5 = blind)", ""]
        cols = [(f"{ps} {c}", f"diag/{ps}/{network}/{c}/auc") for ps in pair_sets
                if ps.endswith(("flipped/cue", "edited/edited_rationale")) for c in DIAGNOSTIC_CHANNELS]
        lines += ["| arm | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for arm in rows:
            s = summary[aliases.get(arm, arm)]
            lines.append(f"| {arm} | " + " | ".join(_cell(s, k, 2) for _, k in cols) + " |")
        if network == "reference":
            lines.append("\nThe reference network is the frozen initial policy, the same in every arm: its rows "
                         "differ only by each arm's fused reward.")
    ch_cols = [("reward", "train/reward"), ("S_ZX", "train/coherence_zx"), ("S_XY", "train/coherence_xy"),
               ("S_ZY", "train/coherence_zy"), ("S_do", "train/coherence_do")]
    lines += ["", "## Coherence channel means on training rollouts (last quarter of the steps)", "",
              "| arm | " + " | ".join(c for c, _ in ch_cols) + " |", "|---" * (len(ch_cols) + 1) + "|"]
    for arm in rows:
        s = summary[aliases.get(arm, arm)]
        lines.append(f"| {arm} | " + " | ".join(_cell(s, k) for _, k in ch_cols) + " |")
    return "\n".join(lines) + "\n"


def write_table(grid: Grid, runs: list[Run], out: Path, description: str) -> dict:
    per_arm: dict[str, list[dict]] = {}
    for run in runs:
        if (run.directory / "done.json").exists():
            per_arm.setdefault(run.arm, []).append(run_metrics(run.directory))
    aliases = {name: spec["same_as"] for name, spec in grid.arms.items()
               if "same_as" in spec and spec["same_as"] in per_arm}
    summary = summarize(per_arm)
    meta = {"description": description, "seeds": grid.seeds, "extra_args": grid.extra_args}
    (out / "results.json").write_text(json.dumps({"meta": meta, "aliases": aliases, "arms": summary,
                                                  "runs": per_arm}, indent=1))
    (out / "results.md").write_text(markdown(summary, aliases, meta))
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default=DEFAULT_GRID, help="grid spec (default: %(default)s)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/grid, or runs/grid_reduced)")
    parser.add_argument("--arms", default=None, help="comma-separated arms to run (default: all)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the grid's)")
    parser.add_argument("--reduced", action="store_true", help="toy sizes from the grid's `reduced` entry")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default: %(default)s)")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from finished runs")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be >= 1")
    grid = load_grid(args.grid, reduced=args.reduced)
    out = Path(args.out or ("runs/grid_reduced" if args.reduced else "runs/grid"))
    out.mkdir(parents=True, exist_ok=True)
    arms = args.arms.split(",") if args.arms else None
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    runs = plan(grid, out, arms, seeds)
    if not args.table_only:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda r: execute(r, args.threads), runs))
        print(f"[grid] {len(runs)} runs in {time.perf_counter() - start:.0f} s", flush=True)
    description = (f"Grid `{args.grid}`{' (reduced)' if args.reduced else ''}, seeds {seeds or grid.seeds}, "
                   f"{args.jobs} run(s) at a time with {args.threads} thread(s) each.")
    summary = write_table(grid, runs, out, description)
    print(f"[grid] wrote {out / 'results.md'} and {out / 'results.json'}", flush=True)
    return summary


if __name__ == "__main__":
    main()
