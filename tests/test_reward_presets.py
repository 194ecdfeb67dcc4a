"""Every reward preset overlay (``configs/rewards/*.yaml``) parses on top of the quickstart config and
resolves to the exponent and weights of its entry in the authors' table (``reward_presets.PRESETS``); and
overlays compose: a preset re-weights and appends, it does not replace the base config's rewards."""

import sys
from pathlib import Path

import pytest
from reward_presets import P_ABLATION, PRESETS

from cepo import AccuracyReward, CEPOModule, CoherenceRewardCallback, FormatReward, PromptDataModule
from cepo.cli import CEPOCLI

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
GSM8K = ROOT / "configs" / "gsm8k_qwen.yaml"
PRESET_FILES = sorted((ROOT / "configs" / "rewards").glob("*.yaml"))
P_ABLATION_PREFIX = "p_ablation_"


def expected_preset(name: str) -> tuple[float, tuple[float, float, float, float]]:
    """(p, weights in the order accuracy, S_ZX, S_XY, S_ZY) that the file ``name.yaml`` must resolve to."""
    if name.startswith(P_ABLATION_PREFIX):
        p = float(name[len(P_ABLATION_PREFIX) :])
        assert p in P_ABLATION, f"{name}: p = {p} is not one of the p-ablation exponents {P_ABLATION}"
        return p, PRESETS["cepo"][1]
    assert name in PRESETS, f"configs/rewards/{name}.yaml has no entry in PRESETS"
    return PRESETS[name]


def test_every_preset_and_ablation_exponent_has_exactly_one_file():
    names = {path.stem for path in PRESET_FILES}
    # A p-ablation point that a named preset already covers (p = 0.2 is "cepo", p = 0 "cepo_geometric")
    # has no file of its own: one file per setting, no copies.
    covered = {p for p, weights in PRESETS.values() if weights == PRESETS["cepo"][1]}
    expected = set(PRESETS) | {f"{P_ABLATION_PREFIX}{p:g}" for p in P_ABLATION if p not in covered}
    assert names == expected
    contents = [path.read_text().split("\nmodel:", 1)[1] for path in PRESET_FILES]
    assert len(set(contents)) == len(contents), "two preset files hold the same settings"


def parse(monkeypatch, tmp_path, *configs: Path, extra: tuple[str, ...] = ()) -> CEPOCLI:
    monkeypatch.setattr(sys, "argv", ["cepo"])  # the CLI reads args=..., not pytest's own command line
    args = [item for config in configs for item in ("--config", str(config))]
    return CEPOCLI(CEPOModule, PromptDataModule, subclass_mode_model=True, auto_configure_optimizers=False,
                   run=False, args=[*args, "--trainer.logger.init_args.save_dir", str(tmp_path), *extra])


def effective_weight(module, reward) -> float:
    return module.reward_weights.get(reward.name, reward.weight)


@pytest.mark.parametrize("preset", PRESET_FILES, ids=lambda path: path.stem)
def test_preset_resolves_to_its_exponent_and_weights(preset, tmp_path, monkeypatch):
    cli = parse(monkeypatch, tmp_path, QUICKSTART, preset)
    p, (w_acc, w_zx, w_xy, w_zy) = expected_preset(preset.stem)
    assert cli.model.reward_p == pytest.approx(p, abs=1e-12)

    rewards = cli.model.reward_functions
    assert len(rewards) == 1 and isinstance(rewards[0], AccuracyReward), "the quickstart's accuracy reward stays"
    assert effective_weight(cli.model, rewards[0]) == pytest.approx(w_acc, abs=1e-5)

    callbacks = [cb for cb in cli.trainer.callbacks if isinstance(cb, CoherenceRewardCallback)]
    assert len(callbacks) == 1, "every preset scores (or at least logs) the coherence channels"
    coherence = callbacks[0]
    assert coherence.weights == pytest.approx({"zx": w_zx, "xy": w_xy, "zy": w_zy}, abs=1e-5)
    assert coherence.network == "reference"
    # Only the reward-hacking study uses the unhardened (naive) Jacobian scores.
    assert coherence.scorer.hardened is (preset.stem != "naive_jacobian")


def test_cepo_overlay_keeps_the_gsm8k_format_reward(tmp_path, monkeypatch):
    cli = parse(monkeypatch, tmp_path, GSM8K, ROOT / "configs" / "rewards" / "cepo.yaml",
                extra=("--trainer.accelerator", "cpu", "--trainer.precision", "32-true"))
    by_type = {type(r): r for r in cli.model.reward_functions}
    assert set(by_type) == {AccuracyReward, FormatReward}
    assert effective_weight(cli.model, by_type[AccuracyReward]) == pytest.approx(0.7)
    assert effective_weight(cli.model, by_type[FormatReward]) == pytest.approx(0.1)
    assert cli.model.reward_p == pytest.approx(0.2)
    assert sum(isinstance(cb, CoherenceRewardCallback) for cb in cli.trainer.callbacks) == 1


def test_overlay_appends_to_the_base_configs_callbacks(tmp_path, monkeypatch):
    base = tmp_path / "base.yaml"
    base.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n")
    cli = parse(monkeypatch, tmp_path, QUICKSTART, base, ROOT / "configs" / "rewards" / "cepo.yaml")
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert "LearningRateMonitor" in names and "CoherenceRewardCallback" in names
