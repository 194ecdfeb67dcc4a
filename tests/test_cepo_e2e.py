"""CE-PO end to end through the CLI on the CPU: the quickstart config with a reward preset on top, at
small sizes, trains the LoRA policy and logs the three coherence channel scores and the fused reward."""

import json
import math
import sys
from pathlib import Path

import pytest

from cepo import CoherenceRewardCallback
from cepo.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
PRESETS = ROOT / "configs" / "rewards"
FLOOR = 0.005
CHANNELS = ("zx", "xy", "zy")
SMALL_SCORER = {"class_path": "cepo.CoherenceScorer", "init_args": {"num_counterfactuals": 2, "micro_batch_size": 8}}


def fit(tmp_path, monkeypatch, preset: str, *extra: str):
    monkeypatch.setattr(sys, "argv", ["cepo"])  # the CLI reads args=..., not pytest's own command line
    return main([
        "fit",
        "--config", QUICKSTART,
        "--config", str(PRESETS / f"{preset}.yaml"),
        "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.callbacks.init_args.scorer", json.dumps(SMALL_SCORER),
        "--data.prompts_per_step", "2",
        "--data.eval_batch_size", "4",
        "--model.init_args.group_size", "2",
        "--model.init_args.micro_batch_size", "4",
        "--model.init_args.generation.max_new_tokens", "24",
        "--model.init_args.optim.lr", "0.01",
        *extra,
    ])


def logged(cli, name: str) -> float:
    metrics = cli.trainer.logged_metrics
    assert name in metrics, f"{name} was not logged; got {sorted(k for k in metrics if k.startswith('train/'))}"
    return float(metrics[name])


def coherence_callback(cli) -> CoherenceRewardCallback:
    (callback,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, CoherenceRewardCallback)]
    return callback


def assert_channel_scores_logged(cli) -> None:
    for c in CHANNELS:
        for suffix in ("mean", "std"):
            assert math.isfinite(logged(cli, f"train/rewards/coherence_{c}_{suffix}")), (c, suffix)
        score = logged(cli, f"train/rewards/coherence_{c}_mean")
        assert FLOOR - 1e-6 <= score <= 1.0 + 1e-6, (c, score)
    # Not degenerate: on the embedded model the channels score well above the floor.
    assert max(logged(cli, f"train/rewards/coherence_{c}_mean") for c in CHANNELS) > 0.05
    for diagnostic in ("zx_shape", "xy_magnitude", "zy_norm"):
        assert math.isfinite(logged(cli, f"train/coherence/{diagnostic}")), diagnostic
    assert logged(cli, "train/time/coherence_s") > 0


def lora_moved(policy) -> bool:
    """LoRA B starts at zero, so any non-zero B weight means an update reached the adapter."""
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    assert lora_b, "the policy has no LoRA adapter"
    return any(float(p.detach().abs().sum()) > 0 for p in lora_b)


@pytest.mark.slow
@pytest.mark.parametrize("network", ["reference", "policy"])
def test_cepo_fit_logs_channel_scores_and_trains_the_adapter(tmp_path, monkeypatch, network):
    # Equal completions get equal scores (and zero advantage), so sample hot enough that groups differ.
    cli = fit(tmp_path, monkeypatch, "cepo", "--trainer.callbacks.init_args.network", network,
              "--model.init_args.generation.temperature", "2.0")
    callback = coherence_callback(cli)
    assert callback.network == network and callback.scorer.num_counterfactuals == 2
    assert callback.weights == {"zx": 0.1, "xy": 0.1, "zy": 0.1} and cli.model.reward_p == pytest.approx(0.2)
    assert cli.model.rollout_step == 2
    assert_channel_scores_logged(cli)
    for name in ("train/reward_mean", "train/rewards/accuracy_mean"):
        assert 0.0 <= logged(cli, name) <= 1.0, name
    # p = 0.2 with every channel score >= the floor: the fused reward is positive even for wrong answers.
    assert logged(cli, "train/reward_mean") > 0
    assert lora_moved(cli.model.policy)


@pytest.mark.slow
def test_accuracy_only_preset_still_logs_the_channel_scores(tmp_path, monkeypatch):
    cli = fit(tmp_path, monkeypatch, "accuracy_only")
    # The callback keeps its own defaults; the preset zeroes the channels by name in model.reward_weights.
    assert coherence_callback(cli).weights == {"zx": 0.1, "xy": 0.1, "zy": 0.1}
    assert dict(cli.model.reward_weights) == {"accuracy": 1.0, "coherence_zx": 0.0, "coherence_xy": 0.0,
                                              "coherence_zy": 0.0}
    assert_channel_scores_logged(cli)
    # Channels with weight 0 are dropped from the power mean: the fused reward is the accuracy.
    assert logged(cli, "train/reward_mean") == pytest.approx(logged(cli, "train/rewards/accuracy_mean"), abs=1e-6)


@pytest.mark.slow
def test_per_term_advantages_with_a_std_floor_train_on_the_coherence_terms(tmp_path, monkeypatch):
    cli = fit(tmp_path, monkeypatch, "cepo", "--model.init_args.advantage.per_term", "true",
              "--model.init_args.advantage.min_std", "0.05", "--model.init_args.group_size", "4",
              "--model.init_args.generation.temperature", "3.0")  # diverse samples: identical texts score alike
    assert cli.model.advantage.per_term and cli.model.advantage.min_std == 0.05
    assert_channel_scores_logged(cli)
    # Per-term advantages are a convex combination of per-term z-scores, and a z-score (unbiased std) is at
    # most (G - 1) / sqrt(G) = 1.5 in size for G = 4 (the floor only shrinks it): no advantage exceeds it.
    assert 0.0 < logged(cli, "train/advantage_abs_mean") <= 1.5 + 1e-6
    assert lora_moved(cli.model.policy)
