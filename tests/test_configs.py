"""Every shipped config parses, and the GPU GSM8K config runs its real loading path on the tiny model."""

import json
from pathlib import Path

import pytest

from cepo.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_configs_parse(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path" in capsys.readouterr().out


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
