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

A grid with ``test: true`` also evaluates each run's final weights with ``cepo test`` (the config's
``data.test`` items, which the run never validated on) and the untrained start likewise; with
``baseline: <arm>`` the table adds, per metric, the mean difference of every arm from that arm over the
seeds and its 95% Welch t interval (unequal variances; a paired design is not assumed).
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
# What is read from each validation and test result line, per dataset.
RESULT_KEYS = ("accuracy", "faithful_rate", "cue_copy_rate", "unfaithful_right_rate", "rationale_accuracy")
# Training curves summarised over the last quarter of the steps.
TRAIN_TAGS = {
    "reward": "train/reward_mean",
    "zero_std_groups": "train/zero_std_groups",
    "coherence_zx": "train/rewards/coherence_zx_mean",
    "coherence_xy": "train/rewards/coherence_xy_mean",
    "coherence_zy": "train/rewards/coherence_zy_mean",
    "coherence_do": "train/rewards/coherence_do_mean",
    # the training rollouts' own faithfulness (all samples of each step; logged by the module every step)
    "rollouts_accuracy": "train/rollouts/accuracy",
    "rollouts_faithful": "train/rollouts/faithful_rate",
    "rollouts_unfaithful_right": "train/rollouts/unfaithful_right_rate",
    "rollouts_cue_copy": "train/rollouts/cue_copy_rate",
    "rollouts_rationale_accuracy": "train/rollouts/rationale_accuracy",
}
# Curves also summarised over the first quarter of the steps, so early and late can be compared.
EARLY_TAGS = ("rollouts_accuracy", "rollouts_faithful", "rollouts_unfaithful_right", "rollouts_cue_copy",
              "rollouts_rationale_accuracy")
DIAGNOSTIC_CHANNELS = ("xy", "zy", "do", "fused", "fused_same_accuracy")


@dataclass
class Run:
    arm: str
    seed: int | None  # None: the untrained start, evaluated once
    command: list[str]
    directory: Path
    test_command: list[str] | None = None  # `cepo test` of the final weights, after `command`

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
    test: bool = False  # also `cepo test` the final weights (and the start) on the config's test items
    baseline: str | None = None  # the arm every other arm's difference is taken from


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
    grid = Grid(list(spec["base"]), list(spec.get("last", [])), list(spec["seeds"]), list(spec.get("start", [])), arms,
                test=bool(spec.get("test", False)), baseline=spec.get("baseline"))
    if grid.baseline is not None and grid.baseline not in arms:
        raise ValueError(f"{path}: baseline {grid.baseline!r} is not an arm; name one of {list(arms)}")
    if reduced:
        small = spec.get("reduced", {})
        grid.seeds = list(small.get("seeds", grid.seeds))
        grid.extra_args = list(small.get("args", []))
    return grid


def plan(grid: Grid, out: Path, arms: list[str] | None = None, seeds: list[int] | None = None,
         order: str = "arm") -> list[Run]:
    """The ``cepo`` commands of the grid: the start evaluation, then every (arm, seed), arm by arm
    (``order="arm"``) or seed by seed (``order="seed"``: every arm of the first seed before the next seed,
    so a grid stopped early has the same seeds in every arm)."""
    if order not in ("arm", "seed"):
        raise ValueError(f"order must be 'arm' or 'seed', got {order!r}")
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

    start_configs = [*configs(grid.base + grid.start + grid.last), *grid.extra_args, *logger("start", "untrained")]
    runs = [Run("start", None, [*cepo, "validate", *start_configs], runs_dir / "start" / "untrained",
                [*cepo, "test", *start_configs] if grid.test else None)]
    for arm in chosen:
        spec = grid.arms[arm]
        if "same_as" in spec:
            continue
        for seed in seeds or grid.seeds:
            options = [*configs(grid.base + spec["configs"] + grid.last), *grid.extra_args, *spec.get("args", []),
                       f"--seed_everything={seed}", f"--data.seed={seed}", *logger(arm, f"seed{seed}")]
            directory = runs_dir / arm / f"seed{seed}"
            test = ([*cepo, "test", *options, f"--ckpt_path={directory / 'checkpoints' / 'last.ckpt'}"]
                    if grid.test else None)
            runs.append(Run(arm, seed, [*cepo, "fit", *options], directory, test))
    if order == "seed":
        position = {seed: i for i, seed in enumerate(seeds or grid.seeds)}
        runs = runs[:1] + sorted(runs[1:], key=lambda r: position[r.seed])  # stable: arm order within a seed
    return runs


def execute(run: Run, threads: int) -> dict:
    """Run one command unless it finished before; returns its ``done.json`` record."""
    done = run.directory / "done.json"
    if done.exists():
        print(f"[grid] skip {run.name} (finished)", flush=True)
        return json.loads(done.read_text())
    lock = _claim(run)
    if lock is None:
        print(f"[grid] skip {run.name} (running in another grid process)", flush=True)
        return {}
    try:
        return _execute_claimed(run, threads, done)
    finally:
        lock.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(run: Run) -> Path | None:
    """Claim ``run`` for this process with a lock file beside its folder (created atomically), so that
    several grid processes can share one output folder; a lock left by a process that died is taken
    over. None when a live process holds it."""
    lock = run.directory.parent / f"{run.directory.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and _pid_alive(holder):
                return None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return lock
    return None


def _execute_claimed(run: Run, threads: int, done: Path) -> dict:
    if run.directory.exists():  # an interrupted run: start it again from scratch
        shutil.rmtree(run.directory)
    run.directory.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    print(f"[grid] run  {run.name}", flush=True)
    start = time.perf_counter()
    with (run.directory / "stdout.log").open("w") as log:
        code = subprocess.call(run.command, stdout=log, stderr=subprocess.STDOUT, env=env)
        if code == 0 and run.test_command is not None:
            code = subprocess.call(run.test_command, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    if code != 0:
        tail = (run.directory / "stdout.log").read_text()[-3000:]
        raise RuntimeError(f"{run.name} failed with exit status {code}:\n{tail}")
    record = {"arm": run.arm, "seed": run.seed, "wall_s": seconds, "command": run.command,
              **({"test_command": run.test_command} if run.test_command else {})}
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
        for key in RESULT_KEYS:
            if key in row and row[key] is not None:
                out[f"{split}/{key}"] = row[key]
    for row in _last_lines(run_dir / "test_results.jsonl"):
        for key in RESULT_KEYS:
            if key in row and row[key] is not None:
                out[f"test/{row['dataset']}/{key}"] = row[key]
    for row in _last_lines(run_dir / "val_diagnostics.jsonl"):
        base = f"diag/{row['pairs']}/{row['network']}/{row['channel']}"
        out[f"{base}/auc"], out[f"{base}/mean_diff"] = row["auc"], row["mean_diff"]
    for name, points in train_curves(run_dir).items():
        tail = points[-max(1, len(points) // 4):]
        out[f"train/{name}"] = sum(v for _, v in tail) / len(tail)
        if name in EARLY_TAGS:
            head = points[: max(1, len(points) // 4)]
            out[f"train_early/{name}"] = sum(v for _, v in head) / len(head)
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


def welch_interval(a: list[float], b: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``a`` minus mean of ``b`` and its ``confidence`` Welch t interval (unequal variances,
    Welch-Satterthwaite degrees of freedom): ``(difference, low, high)``. NaN where either side has fewer
    than two values; a zero-width interval where both sides have no spread."""
    from scipy.stats import t as student_t

    a = [v for v in a if v is not None and not math.isnan(v)]
    b = [v for v in b if v is not None and not math.isnan(v)]
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan"), float("nan")
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa**2 / len(a), sb**2 / len(b)
    diff = ma - mb
    if va + vb == 0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = student_t.ppf(0.5 + confidence / 2, df) * math.sqrt(va + vb)
    return diff, float(diff - half), float(diff + half)


def differences(per_run: dict[str, list[dict[str, float]]], baseline: str, keys: list[str]) -> dict[str, dict]:
    """``{arm: {metric: [difference, low, high]}}``: each arm minus ``baseline`` with its Welch interval."""
    base = per_run[baseline]
    return {arm: {k: list(welch_interval([r.get(k, float("nan")) for r in runs],
                                         [r.get(k, float("nan")) for r in base])) for k in keys}
            for arm, runs in per_run.items() if arm not in (baseline, "start")}


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


TEST_COLUMNS = [
    ("acc ID", "test/in_distribution/accuracy"), ("acc flipped", "test/flipped/accuracy"),
    ("acc edited", "test/edited/accuracy"), ("faithful ID", "test/in_distribution/faithful_rate"),
    ("faithful flipped", "test/flipped/faithful_rate"), ("faithful edited", "test/edited/faithful_rate"),
    ("unfaithful-right ID", "test/in_distribution/unfaithful_right_rate"),
    ("rationale right ID", "test/in_distribution/rationale_accuracy"),
    ("rationale right flipped", "test/flipped/rationale_accuracy"),
    ("cue copy ID", "test/in_distribution/cue_copy_rate"), ("cue copy flipped", "test/flipped/cue_copy_rate"),
    ("cue copy edited", "test/edited/cue_copy_rate"),
]
ROLLOUT_COLUMNS = [
    ("accuracy, first quarter", "train_early/rollouts_accuracy"), ("accuracy, last quarter", "train/rollouts_accuracy"),
    ("unfaithful-right, first quarter", "train_early/rollouts_unfaithful_right"),
    ("unfaithful-right, last quarter", "train/rollouts_unfaithful_right"),
    ("faithful, first quarter", "train_early/rollouts_faithful"), ("faithful, last quarter", "train/rollouts_faithful"),
    ("cue copy, first quarter", "train_early/rollouts_cue_copy"), ("cue copy, last quarter", "train/rollouts_cue_copy"),
    ("rationale right, first quarter", "train_early/rollouts_rationale_accuracy"),
    ("rationale right, last quarter", "train/rollouts_rationale_accuracy"),
]


def _interval(value: list[float] | None) -> str:
    if value is None or math.isnan(value[0]):
        return "-"
    diff, low, high = value
    mark = "**" if low > 0 or high < 0 else ""  # the interval excludes 0
    return f"{mark}{diff:+.3f} [{low:+.3f}, {high:+.3f}]{mark}"


def held_out_markdown(summary: dict[str, dict], diffs: dict[str, dict] | None, baseline: str | None,
                      seeds_done: dict[str, list] | None = None) -> str:
    """The test-item table, the training rollouts' faithfulness early and late, and (with a baseline) the
    differences from it with their Welch intervals."""
    lines = ["", "## Held-out test items, final weights (mean ± std over seeds)", "",
             "Seeds finished per arm: " + "; ".join(f"{arm} {seeds}" for arm, seeds in (seeds_done or {}).items()
                                                    if arm != "start") + ".", "",
             "| arm | seeds | " + " | ".join(c for c, _ in TEST_COLUMNS) + " |", "|---" * (len(TEST_COLUMNS) + 2) + "|"]
    for arm, s in summary.items():
        lines.append(f"| {arm} | {s['n']} | " + " | ".join(_cell(s, k) for _, k in TEST_COLUMNS) + " |")
    lines += ["", "## Training rollouts (all samples of a step; mean over the first and the last quarter of the steps)",
              "", "| arm | " + " | ".join(c for c, _ in ROLLOUT_COLUMNS) + " |", "|---" * (len(ROLLOUT_COLUMNS) + 1) + "|"]
    for arm, s in summary.items():
        if arm != "start":
            lines.append(f"| {arm} | " + " | ".join(_cell(s, k) for _, k in ROLLOUT_COLUMNS) + " |")
    if diffs:
        columns = TEST_COLUMNS + [c for c in ROLLOUT_COLUMNS if "unfaithful" in c[0] or "cue copy" in c[0]]
        lines += ["", f"## Difference from {baseline}: mean over seeds and 95% Welch t interval", "",
                  "Bold: the interval excludes 0. Test columns are on the held-out test items; the last ones are "
                  "the training rollouts'.", "",
                  "| arm | " + " | ".join(c for c, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for arm, d in diffs.items():
            lines.append(f"| {arm} | " + " | ".join(_interval(d.get(k)) for _, k in columns) + " |")
    return "\n".join(lines) + "\n"


def write_table(grid: Grid, runs: list[Run], out: Path, description: str) -> dict:
    per_arm: dict[str, list[dict]] = {}
    seeds_done: dict[str, list[int | None]] = {}
    for run in runs:
        if (run.directory / "done.json").exists():
            per_arm.setdefault(run.arm, []).append(run_metrics(run.directory))
            seeds_done.setdefault(run.arm, []).append(run.seed)
    aliases = {name: spec["same_as"] for name, spec in grid.arms.items()
               if "same_as" in spec and spec["same_as"] in per_arm}
    summary = summarize(per_arm)
    meta = {"description": description, "seeds": grid.seeds, "extra_args": grid.extra_args, "seeds_done": seeds_done}
    diffs = None
    if grid.baseline is not None and grid.baseline in per_arm:
        keys = [k for _, k in TEST_COLUMNS + ROLLOUT_COLUMNS]
        diffs = differences(per_arm, grid.baseline, keys)
    report = markdown(summary, aliases, meta)
    if grid.test:
        report += held_out_markdown(summary, diffs, grid.baseline, seeds_done)
    (out / "results.json").write_text(json.dumps({"meta": meta, "aliases": aliases, "arms": summary,
                                                  "differences": diffs, "baseline": grid.baseline,
                                                  "runs": per_arm}, indent=1))
    (out / "results.md").write_text(report)
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
    parser.add_argument("--order", choices=("arm", "seed"), default="arm",
                        help="run arm by arm, or seed by seed (every arm of a seed before the next seed)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be >= 1")
    grid = load_grid(args.grid, reduced=args.reduced)
    out = Path(args.out or ("runs/grid_reduced" if args.reduced else "runs/grid"))
    out.mkdir(parents=True, exist_ok=True)
    arms = args.arms.split(",") if args.arms else None
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    runs = plan(grid, out, arms, seeds, order=args.order)
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
