"""The experiment grid script: its plan, its statistics, and the reduced grid end to end (resumable)."""

import json
import math
from pathlib import Path

import pytest

from cepo.experiments import grid as G

ROOT = Path(__file__).resolve().parents[1]
GRID = str(ROOT / "configs" / "experiments" / "grid.yaml")


def test_plan_orders_configs_and_covers_every_arm_and_seed(tmp_path):
    grid = G.load_grid(GRID)
    assert set(grid.arms) >= {"accuracy_only", "cepo", "jacobian_only", "naive_jacobian", "p_-2", "p_0", "p_0.2",
                              "p_1", "p_10", "cepo_policy_network", "interventional"}
    assert len(grid.seeds) >= 3
    runs = G.plan(grid, tmp_path)
    assert runs[0].arm == "start" and "validate" in runs[0].command
    trained = [r for r in runs if r.seed is not None]
    real_arms = [a for a, spec in grid.arms.items() if "same_as" not in spec]
    assert len(trained) == len(real_arms) * len(grid.seeds)
    cepo = next(r for r in trained if r.arm == "cepo" and r.seed == grid.seeds[1])
    configs = [cepo.command[i + 1] for i, a in enumerate(cepo.command) if a == "--config"]
    assert configs == grid.base + ["configs/rewards/cepo.yaml"] + grid.last  # the diagnostics overlay appends last
    assert f"--seed_everything={grid.seeds[1]}" in cepo.command and f"--data.seed={grid.seeds[1]}" in cepo.command
    for name, spec in grid.arms.items():  # every overlay a run needs exists
        for path in spec.get("configs", []):
            assert (ROOT / path).exists(), path
    with pytest.raises(ValueError, match="unknown arms"):
        G.plan(grid, tmp_path, arms=["cepo", "nope"])


def test_bad_grid_specs_are_named(tmp_path):
    spec = tmp_path / "g.yaml"
    spec.write_text("base: [a.yaml]\nseeds: [0]\narms:\n  x: {same_as: y}\n")
    with pytest.raises(ValueError, match="'y', which is not an arm"):
        G.load_grid(spec)
    spec.write_text("base: [a.yaml]\nseeds: [0]\narms:\n  x: {args: [--a=1]}\n")
    with pytest.raises(ValueError, match="needs `configs`"):
        G.load_grid(spec)


def test_mean_std_and_summary_by_hand():
    assert G.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std
    assert G.mean_std([0.5]) == (0.5, 0.0)
    assert all(math.isnan(v) for v in G.mean_std([float("nan")]))
    summary = G.summarize({"a": [{"x": 0.2, "y": 1.0}, {"x": 0.4}]})
    assert summary["a"]["n"] == 2 and summary["a"]["x"] == pytest.approx([0.3, math.sqrt(0.02)])
    assert summary["a"]["y"] == [1.0, 0.0]  # a metric only one seed reported


@pytest.mark.slow
def test_reduced_grid_end_to_end_and_resumes(tmp_path, capsys):
    args = ["--grid", GRID, "--reduced", "--out", str(tmp_path), "--arms", "accuracy_only,cepo", "--jobs", "2"]
    G.main(args)
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["arms"]) == {"start", "accuracy_only", "cepo"}
    assert result["aliases"] == {"p_0.2": "cepo"}
    for arm in ("accuracy_only", "cepo"):
        s = result["arms"][arm]
        assert s["n"] == 2
        for split in G.SPLITS:
            mean, std = s[f"{split}/accuracy"]
            assert 0.0 <= mean <= 1.0 and std >= 0.0
        assert s["wall_s"][0] > 0
        assert "train/reward" in s and "train/coherence_xy" in s  # TensorBoard curves were read
        # diagnostics of the final validation, on both networks
        assert s["diag/flipped/cue/policy/fused/auc"][0] == 1.0  # the cue is always wrong on `flipped`
        assert "diag/flipped/cue/reference/do/auc" in s
        runs = result["runs"][arm]
        assert len(runs) == 2 and runs[0]["flipped/accuracy"] >= 0
    assert result["arms"]["start"]["n"] == 1
    table = (tmp_path / "results.md").read_text()
    assert "| cepo | 2 |" in table and "| p_0.2 (= cepo) | 2 |" in table and "pairwise AUC" in table
    done = sorted(tmp_path.glob("runs/*/*/done.json"))
    assert len(done) == 5
    stamps = [p.stat().st_mtime for p in done]
    capsys.readouterr()
    G.main(args)  # everything finished: nothing runs again, the table is rebuilt
    assert capsys.readouterr().out.count("[grid] skip") == 5
    assert [p.stat().st_mtime for p in done] == stamps


def arm_commands():
    grid = G.load_grid(GRID)
    return [(run.name, run.command[4:]) for run in G.plan(grid, Path("unused"), seeds=grid.seeds[:1])]


@pytest.mark.parametrize("name, args", arm_commands(), ids=[name for name, _ in arm_commands()])
def test_every_arm_command_parses(name, args, capsys, monkeypatch):
    """Each run's configs and flags make a valid `cepo` command (an option renamed elsewhere breaks here)."""
    from cepo.cli import main

    monkeypatch.chdir(ROOT)
    subcommand = "validate" if name == "start" else "fit"
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, *args, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "RewardDiagnostics" in printed and "during_fit: last" in printed


def test_welch_interval_by_hand():
    # a = 1,2,3 and b = 4,5,6: difference -3; each side's variance of the mean 1/3, so the standard error is
    # sqrt(2/3) and the Welch-Satterthwaite df = (2/3)^2 / (2 * (1/3)^2 / 2) = 4; t(0.975, 4) = 2.776445
    diff, low, high = G.welch_interval([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    half = 2.776445 * math.sqrt(2 / 3)
    assert diff == -3.0 and low == pytest.approx(-3 - half, abs=1e-5) and high == pytest.approx(-3 + half, abs=1e-5)
    # unequal variances and sizes: df = 5.5214 (hand), interval [-7.3854, 0.3854] (scipy's Welch test agrees)
    diff, low, high = G.welch_interval([1, 2, 3, 4], [2, 4, 6, 8, 10])
    assert (diff, low, high) == pytest.approx((-3.5, -7.38537, 0.38537), abs=1e-4)
    assert G.welch_interval([0.5, 0.5], [0.2, 0.2]) == (pytest.approx(0.3), pytest.approx(0.3), pytest.approx(0.3))
    assert all(math.isnan(v) for v in G.welch_interval([1.0], [1.0, 2.0]))  # one seed: no interval


def test_differences_from_the_baseline_arm():
    per_run = {"start": [{"x": 0.0}], "base": [{"x": 0.1}, {"x": 0.3}], "arm": [{"x": 0.4}, {"x": 0.6}]}
    diffs = G.differences(per_run, "base", ["x"])
    assert set(diffs) == {"arm"}  # neither the baseline nor the start is compared with the baseline
    assert diffs["arm"]["x"] == pytest.approx(list(G.welch_interval([0.4, 0.6], [0.1, 0.3])))
    assert diffs["arm"]["x"][0] == pytest.approx(0.3)


def test_seed_order_runs_every_arm_of_a_seed_before_the_next(tmp_path):
    grid = G.load_grid(GRID)
    runs = G.plan(grid, tmp_path, arms=["accuracy_only", "cepo"], seeds=[0, 1], order="seed")
    assert [(r.arm, r.seed) for r in runs] == [("start", None), ("accuracy_only", 0), ("cepo", 0),
                                               ("accuracy_only", 1), ("cepo", 1)]
    by_arm = G.plan(grid, tmp_path, arms=["accuracy_only", "cepo"], seeds=[0, 1])
    assert [(r.arm, r.seed) for r in by_arm][1:3] == [("accuracy_only", 0), ("accuracy_only", 1)]
    with pytest.raises(ValueError, match="order must be"):
        G.plan(grid, tmp_path, order="random")


def test_hard_grid_tests_final_weights_and_compares_with_accuracy_only(tmp_path):
    grid = G.load_grid(ROOT / "configs" / "experiments" / "hard_grid.yaml")
    assert grid.test and grid.baseline == "accuracy_only" and grid.seeds == [0, 1, 2, 3, 4]
    assert grid.base == ["configs/quickstart_hard.yaml"]
    runs = G.plan(grid, tmp_path)
    start = runs[0]
    assert start.test_command is not None and "test" in start.test_command and "--ckpt_path" not in " ".join(start.test_command)
    for run in runs[1:]:
        assert run.test_command[run.test_command.index("-m") + 2] == "test"
        assert f"--ckpt_path={run.directory / 'checkpoints' / 'last.ckpt'}" in run.test_command
        # the test command evaluates the run's own configuration
        assert run.test_command[4:-1] == run.command[4:]
    for spec in grid.arms.values():
        for path in spec.get("configs", []):
            assert (ROOT / path).exists(), path
    bad = tmp_path / "g.yaml"
    bad.write_text("base: [a.yaml]\nseeds: [0]\nbaseline: nope\narms:\n  x: {configs: [a.yaml]}\n")
    with pytest.raises(ValueError, match="baseline 'nope' is not an arm"):
        G.load_grid(bad)


def test_a_run_is_claimed_by_one_grid_process_at_a_time(tmp_path, capsys):
    run = G.Run("arm", 0, ["true"], tmp_path / "runs" / "arm" / "seed0")
    lock = G._claim(run)
    assert lock is not None and lock.read_text() == str(__import__("os").getpid())
    assert G._claim(run) is None  # held by a live process (this one)
    assert G.execute(run, threads=1) == {} and "running in another grid process" in capsys.readouterr().out
    assert not run.directory.exists()  # the holder's folder is left alone
    lock.write_text("999999999")  # a holder that died: its lock is taken over
    assert G._claim(run) == lock and lock.read_text() != "999999999"
    lock.unlink()
    assert G.execute(run, threads=1)["arm"] == "arm" and (run.directory / "done.json").exists()
    assert not lock.exists()  # released after the run


@pytest.mark.slow
def test_reduced_hard_grid_tests_final_weights_and_reports_welch_intervals(tmp_path):
    spec = str(ROOT / "configs" / "experiments" / "hard_grid.yaml")
    G.main(["--grid", spec, "--reduced", "--out", str(tmp_path), "--arms", "accuracy_only,sdo_lagged", "--jobs", "2"])
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["baseline"] == "accuracy_only" and set(result["arms"]) == {"start", "accuracy_only", "sdo_lagged"}
    for arm in ("start", "accuracy_only", "sdo_lagged"):  # `cepo test` ran on each run's final weights
        assert 0.0 <= result["arms"][arm]["test/flipped/accuracy"][0] <= 1.0
    trained = result["arms"]["sdo_lagged"]
    assert "train/rollouts_unfaithful_right" in trained and "train_early/rollouts_unfaithful_right" in trained
    assert "train/coherence_do" in trained  # the lagged S_do was computed
    # one seed per arm in the reduced grid: no interval, reported as such
    assert all(math.isnan(v[0]) for v in result["differences"]["sdo_lagged"].values())
    table = (tmp_path / "results.md").read_text()
    assert "Held-out test items" in table and "Difference from accuracy_only" in table
