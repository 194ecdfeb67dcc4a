"""Plot the reward grid's accuracy-robustness trade-off: in-distribution vs flipped accuracy per arm.

    python benchmarks/plot_grid.py --results runs/grid/results.json --out runs/grid/tradeoff.png
    python benchmarks/plot_grid.py --results runs/hard_grid/results.json --prefix test/ --out runs/hard_grid/tradeoff.png

Each point is an arm's mean over seeds with its standard deviation as error bars; the untrained policy is
the start. Reads the ``results.json`` that ``python -m cepo.experiments.grid`` writes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="runs/grid/results.json", help="the grid's results.json")
    parser.add_argument("--out", default="runs/grid/tradeoff.png", help="PNG to write")
    parser.add_argument("--prefix", default="", help="metric prefix: '' for the last validation, 'test/' for the "
                        "held-out test items of a grid with `test: true`")
    parser.add_argument("--title", default="Reward grid: mean ± std over seeds, after 60 rollouts")
    args = parser.parse_args(argv)
    arms = json.loads(Path(args.results).read_text())["arms"]
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for name, arm in arms.items():
        if name == "p_0.2":  # the CE-PO preset itself, plotted as "cepo"
            continue
        if args.prefix + "flipped/accuracy" not in arm:
            continue
        x, dx = arm[args.prefix + "in_distribution/accuracy"]
        y, dy = arm[args.prefix + "flipped/accuracy"]
        style = {"start": "k*", "accuracy_only": "bs", "accuracy_only_scale_none": "bD"}.get(name, "ro")
        ax.errorbar(x, y, xerr=dx, yerr=dy, fmt=style, capsize=2, alpha=0.8)
        ax.annotate(f"{name} (n={arm['n']})", (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("accuracy, in_distribution (cue agrees)")
    ax.set_ylabel("accuracy, flipped (cue never agrees)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
