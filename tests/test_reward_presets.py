"""Every reward preset overlay (``configs/rewards/*.yaml``) parses on top of the quickstart config and
resolves to the exponent and weights of its entry in ``cepo.rewards.combiner.PRESETS``."""

import sys
from pathlib import Path

import pytest

from cepo import AccuracyReward, CEPOModule, CoherenceRewardCallback, PromptDataModule
from cepo.cli import CEPOCLI
from cepo.rewards.combiner import P_ABLATION, PRESETS

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
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


def test_every_preset_and_ablation_exponent_has_a_file():
    names = {path.stem for path in PRESET_FILES}
    expected = set(PRESETS) | {f"{P_ABLATION_PREFIX}{p:g}" for p in P_ABLATION}
    assert names == expected


@pytest.mark.parametrize("preset", PRESET_FILES, ids=lambda path: path.stem)
def test_preset_resolves_to_its_exponent_and_weights(preset, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cepo"])  # the CLI reads args=..., not pytest's own command line
    cli = CEPOCLI(
        CEPOModule,
        PromptDataModule,
        subclass_mode_model=True,
        auto_configure_optimizers=False,
        run=False,
        args=[
            "--config", str(QUICKSTART),
            "--config", str(preset),
            "--trainer.logger.init_args.save_dir", str(tmp_path),
        ],
    )
    p, (w_acc, w_zx, w_xy, w_zy) = expected_preset(preset.stem)
    assert cli.model.reward_p == pytest.approx(p, abs=1e-12)

    rewards = cli.model.reward_functions
    assert len(rewards) == 1 and isinstance(rewards[0], AccuracyReward), "a preset holds the accuracy reward only"
    assert rewards[0].weight == pytest.approx(w_acc, abs=1e-5)

    callbacks = [cb for cb in cli.trainer.callbacks if isinstance(cb, CoherenceRewardCallback)]
    assert len(callbacks) == 1, "every preset scores (or at least logs) the coherence channels"
    coherence = callbacks[0]
    assert coherence.weights == pytest.approx({"zx": w_zx, "xy": w_xy, "zy": w_zy}, abs=1e-5)
    assert coherence.network == "reference"
    # Only the reward-hacking study uses the unhardened (naive) Jacobian scores.
    assert coherence.scorer.hardened is (preset.stem != "naive_jacobian")
