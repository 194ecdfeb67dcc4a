"""Every shipped config parses (task configs alone, algorithm overlays on top of the quickstart config and
resolving to their algorithm, with the KL coefficient's one default), and the GPU GSM8K config runs its real
loading path on the tiny model."""

import json
from pathlib import Path

import pytest

from cepo.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))
ALGORITHMS = {  # overlay -> (module class, advantage estimator, KL placement, has a critic)
    "grpo": ("GRPO", "grpo", "loss", False),
    "rloo": ("RLOO", "rloo", "loss", False),
    "reinforce_pp": ("ReinforcePP", "reinforce_pp", "reward", False),
    "ppo": ("PPO", "gae", "reward", True),
}


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_configs_parse(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path" in capsys.readouterr().out


def test_every_algorithm_has_an_overlay():
    assert {p.stem for p in (ROOT / "configs" / "algorithms").glob("*.yaml")} == set(ALGORITHMS)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_algorithm_overlay_composes_with_the_quickstart_config(name, tmp_path, monkeypatch):
    import sys

    from cepo import CEPOModule, PromptDataModule
    from cepo.cli import CEPOCLI
    from cepo.training.module import KLConfig

    monkeypatch.setattr(sys, "argv", ["cepo"])
    cli = CEPOCLI(CEPOModule, PromptDataModule, subclass_mode_model=True, auto_configure_optimizers=False, run=False,
                  args=["--config", str(ROOT / "configs" / "quickstart.yaml"),
                        "--config", str(ROOT / "configs" / "algorithms" / f"{name}.yaml"),
                        "--trainer.logger.init_args.save_dir", str(tmp_path)])
    cls, estimator, placement, critic = ALGORITHMS[name]
    module = cli.model
    assert type(module).__name__ == cls and module.algorithm == name
    assert module.advantage.estimator == estimator and module.kl.placement == placement
    assert (module.critic_config is not None) is critic
    assert module.kl.coef == KLConfig().coef  # the one default, written in KLConfig only
    # The task stays the quickstart's.
    assert module.policy_config.name_or_path == "embedded:tiny-shortcut-llama"
    assert cli.datamodule.train_source.split == "train"


def test_algorithm_overlay_keeps_the_base_configs_kl_coefficient(tmp_path, monkeypatch):
    """An overlay sets its algorithm's KL placement, not the coefficient: a base config's kl.coef stays."""
    import sys

    from cepo import CEPOModule, PromptDataModule
    from cepo.cli import CEPOCLI

    base = tmp_path / "base.yaml"
    base.write_text("model:\n  init_args:\n    kl: {coef: 0.01}\n")
    monkeypatch.setattr(sys, "argv", ["cepo"])
    cli = CEPOCLI(CEPOModule, PromptDataModule, subclass_mode_model=True, auto_configure_optimizers=False, run=False,
                  args=["--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(base),
                        "--config", str(ROOT / "configs" / "algorithms" / "ppo.yaml"),
                        "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert (cli.model.kl.coef, cli.model.kl.placement) == (0.01, "reward")


@pytest.mark.slow
def test_gsm8k_config_runs_on_the_embedded_model(tmp_path):
    rows = [
        {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
        {"question": "A box holds 1,200 pens; 200 are sold. How many remain?", "answer": "#### 1,000"},
    ]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    dataset = {"class_path": "cepo.FileDataset", "init_args": {"path": str(data), "adapter": "gsm8k"}}
    cli = main([
        "fit", "--config", str(ROOT / "configs" / "gsm8k_qwen.yaml"),
        "--model.init_args.policy.name_or_path", "embedded:tiny-shortcut-llama",
        "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--model.init_args.generation.max_new_tokens", "8",
        "--model.init_args.group_size", "2",
        "--data.prompts_per_step", "2", "--data.eval_batch_size", "2",
        "--data.train", json.dumps(dataset),
        "--data.val", json.dumps([{**dataset, "init_args": {**dataset["init_args"], "name": "gsm8k_val"}}]),
    ])
    # The chat template is applied to the prompt the policy sees, and the GSM8K gold was parsed.
    example = cli.datamodule.train_source.load()[1]
    assert example.gold == ("1000",)
    prompt = cli.model.render_prompts([example])[0]
    assert prompt.startswith("[user] ") and prompt.endswith("[assistant] ") and "<answer>" in prompt
    assert cli.model.rollout_step == 1
    assert float(cli.trainer.callback_metrics["val/gsm8k_val/n"]) == 2
