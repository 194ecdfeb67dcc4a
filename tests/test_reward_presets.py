"""Every reward preset overlay (``configs/rewards/*.yaml``) parses on top of the quickstart config and
resolves to the exponent and weights of its entry in the authors' table (``reward_presets.PRESETS``), and
so does every p-ablation arm of the experiment grid (the CE-PO preset with ``reward_p`` overridden); and
overlays compose: a preset re-weights and appends, it does not replace the base config's rewards."""

import sys
from pathlib import Path

import pytest
from reward_presets import P_ABLATION, PRESETS

from cepo import (AccuracyReward, CEPOModule, CoherenceRewardCallback, FormatReward, InterventionalRewardCallback,
                  NetworkReward, PromptDataModule)
from cepo.cli import CEPOCLI
from cepo.experiments.grid import load_grid

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
GSM8K = ROOT / "configs" / "gsm8k_qwen.yaml"
PRESET_FILES = sorted((ROOT / "configs" / "rewards").glob("*.yaml"))
GRID = load_grid(ROOT / "configs" / "experiments" / "grid.yaml")
# The grid's p-ablation arms: `p_<exponent>`, each the CE-PO preset or a named preset (cepo_geometric).
P_ARMS = {name: arm for name, arm in GRID.arms.items() if name.startswith("p_") and "configs" in arm}


def test_every_preset_file_is_in_the_table_and_holds_its_own_settings():
    assert {path.stem for path in PRESET_FILES} == set(PRESETS)
    contents = [path.read_text().split("\nmodel:", 1)[1] for path in PRESET_FILES]
    assert len(set(contents)) == len(contents), "two preset files hold the same settings"


def test_the_p_ablation_is_overrides_of_the_cepo_preset_in_the_grid():
    """No near-copy files: a p-ablation arm is the CE-PO preset plus `--model.init_args.reward_p=P`, or a
    named preset that already has the CE-PO weights at that exponent."""
    assert len(P_ARMS) >= 4
    for name, arm in P_ARMS.items():
        p = float(name[len("p_"):])
        assert p in P_ABLATION, f"grid arm {name}: p = {p} is not one of the p-ablation exponents {P_ABLATION}"
        overrides = [a for a in arm.get("args", []) if a.startswith("--model.init_args.reward_p=")]
        if overrides:
            assert arm["configs"] == ["configs/rewards/cepo.yaml"] and overrides == [f"--model.init_args.reward_p={p}"]
        else:
            (preset,) = arm["configs"]
            assert PRESETS[Path(preset).stem] == (p, PRESETS["cepo"][1])


def parse(monkeypatch, tmp_path, *configs: Path, extra: tuple[str, ...] = ()) -> CEPOCLI:
    monkeypatch.setattr(sys, "argv", ["cepo"])  # the CLI reads args=..., not pytest's own command line
    args = [item for config in configs for item in ("--config", str(config))]
    return CEPOCLI(CEPOModule, PromptDataModule, subclass_mode_model=True, auto_configure_optimizers=False,
                   run=False, args=[*args, "--trainer.logger.init_args.save_dir", str(tmp_path), *extra])


def effective_weight(module, reward) -> float:
    return module.reward_weights.get(reward.name, reward.weight)


def effective_channel_weights(module, coherence) -> dict[str, float]:
    return {c: module.reward_weights.get(f"coherence_{c}", w) for c, w in coherence.weights.items()}


PRESET_CASES = [(path.stem, [path], ()) for path in PRESET_FILES] + [
    (name, [ROOT / c for c in arm["configs"]], tuple(arm.get("args", []))) for name, arm in sorted(P_ARMS.items())]


@pytest.mark.parametrize("name, overlays, args", PRESET_CASES, ids=[case[0] for case in PRESET_CASES])
def test_preset_resolves_to_its_exponent_and_weights(name, overlays, args, tmp_path, monkeypatch):
    cli = parse(monkeypatch, tmp_path, QUICKSTART, *overlays, extra=args)
    if name.startswith("p_"):
        p, (w_acc, w_zx, w_xy, w_zy) = float(name[len("p_"):]), PRESETS["cepo"][1]
    else:
        p, (w_acc, w_zx, w_xy, w_zy) = PRESETS[name]
    assert cli.model.reward_p == pytest.approx(p, abs=1e-12)

    rewards = cli.model.reward_functions
    assert len(rewards) == 1 and isinstance(rewards[0], AccuracyReward), "the quickstart's accuracy reward stays"
    assert effective_weight(cli.model, rewards[0]) == pytest.approx(w_acc, abs=1e-5)

    callbacks = [cb for cb in cli.trainer.callbacks if isinstance(cb, CoherenceRewardCallback)]
    assert len(callbacks) == 1, "every preset scores (or at least logs) the coherence channels"
    coherence = callbacks[0]
    assert effective_channel_weights(cli.model, coherence) == pytest.approx({"zx": w_zx, "xy": w_xy, "zy": w_zy},
                                                                             abs=1e-5)
    assert coherence.network == "reference"
    # Only the reward-hacking study uses the unhardened (naive) Jacobian scores.
    assert coherence.scorer.hardened is (name != "naive_jacobian")


# Every overlay shipped under configs/ (the grid specs are not cepo configs); an overlay documented as stacked
# on a preset is parsed on top of it.
OVERLAYS = sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").glob("*/*.yaml")
                  if p.name not in {"grid.yaml", "hard_grid.yaml", "hard_selection.yaml"})
STACKED_ON = {"experiments/cepo_interventional.yaml": ["rewards/cepo.yaml"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_keeps_the_gsm8k_format_reward(overlay, tmp_path, monkeypatch):
    configs = [ROOT / "configs" / c for c in [*STACKED_ON.get(overlay, []), overlay]]
    cli = parse(monkeypatch, tmp_path, GSM8K, *configs,
                extra=("--trainer.accelerator", "cpu", "--trainer.precision", "32-true"))
    by_type = {type(r): r for r in cli.model.reward_functions}
    assert set(by_type) == {AccuracyReward, FormatReward}, f"{overlay} replaced the base config's rewards"
    assert effective_weight(cli.model, by_type[FormatReward]) == pytest.approx(0.1)


def test_cepo_overlay_reweights_accuracy_on_the_gsm8k_config(tmp_path, monkeypatch):
    cli = parse(monkeypatch, tmp_path, GSM8K, ROOT / "configs" / "rewards" / "cepo.yaml",
                extra=("--trainer.accelerator", "cpu", "--trainer.precision", "32-true"))
    by_type = {type(r): r for r in cli.model.reward_functions}
    assert effective_weight(cli.model, by_type[AccuracyReward]) == pytest.approx(0.7)
    assert cli.model.reward_p == pytest.approx(0.2)
    assert sum(isinstance(cb, CoherenceRewardCallback) for cb in cli.trainer.callbacks) == 1


def test_the_interventional_overlay_stacks_on_the_cepo_preset(tmp_path, monkeypatch):
    cli = parse(monkeypatch, tmp_path, QUICKSTART, ROOT / "configs" / "rewards" / "cepo.yaml",
                ROOT / "configs" / "experiments" / "cepo_interventional.yaml")
    rewards = [cb for cb in cli.trainer.callbacks if isinstance(cb, NetworkReward)]
    assert [type(cb) for cb in rewards] == [CoherenceRewardCallback, InterventionalRewardCallback]
    coherence, interventional = rewards
    assert cli.model.reward_p == pytest.approx(0.2)  # the preset's exponent stays
    assert effective_weight(cli.model, cli.model.reward_functions[0]) == pytest.approx(0.7)
    assert effective_channel_weights(cli.model, coherence) == {"zx": 0.0, "xy": 0.0, "zy": 0.0}
    assert interventional.weights == {"do": 0.3, "med": 0.0}
    assert coherence.network == interventional.network == "reference"


def test_overlay_appends_to_the_base_configs_callbacks(tmp_path, monkeypatch):
    base = tmp_path / "base.yaml"
    base.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n")
    cli = parse(monkeypatch, tmp_path, QUICKSTART, base, ROOT / "configs" / "rewards" / "cepo.yaml")
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert "LearningRateMonitor" in names and "CoherenceRewardCallback" in names
