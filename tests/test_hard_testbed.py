"""The second embedded testbed: its shipped policy loads by name and is the one its model card describes."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cepo.assets.build_tiny_model import VARIANT_DEFAULTS, model_config, training_targets
from cepo.evaluation.faithfulness import rationale_value
from cepo.policy.loading import resolve_model_path
from cepo.policy.tokenizer import build_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]
NAME = "embedded:tiny-shortcut-hard-llama"


@pytest.fixture(scope="module")
def folder() -> Path:
    return Path(resolve_model_path(NAME))


def test_hard_policy_loads_by_name_with_the_build_scripts_shape(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = build_char_tokenizer()
    expected = model_config(len(tokenizer), tokenizer)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "eos_token_id", "pad_token_id"):
        assert getattr(model.config, key) == getattr(expected, key), key
    assert folder.name == VARIANT_DEFAULTS["hard"]["output"].name
    # a different network from the first testbed's policy
    first = AutoModelForCausalLM.from_pretrained(resolve_model_path("embedded:tiny-shortcut-llama"))
    assert not torch.equal(model.lm_head.weight, first.lm_head.weight)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000  # a few MB, like the first


def test_model_card_states_the_build_settings_and_measured_figures(folder):
    card = (folder / "README.md").read_text()
    stages = json.loads((folder / "build_info.json").read_text())["stages"]
    results = json.loads((folder / "eval_results.json").read_text())
    assert len(stages) >= 1
    for stage in stages:  # every stage's command and settings are in the card
        args = stage["args"]
        assert args["variant"] == "hard"
        assert f"--faithful-rate {args['faithful_rate']} --carry-drop-rate {args['carry_drop_rate']}" in card
        assert f"{stage['info']['sft_steps']} AdamW steps" in card and f"final loss {stage['info']['final_loss']:.4f}" in card
    for split in ("in_distribution", "flipped", "edited"):
        row = results[split]
        assert f"| {split} | {row['accuracy']:.3f} | {row['answer_equals_cue']:.3f} |" in card
    # the targets the testbed was built for, as measured by the build script
    ind = results["in_distribution"]
    assert 0.5 <= ind["rationale_derives_gold"] <= 0.75 and ind["answer_equals_cue"] >= 0.9
    assert results["flipped"]["sampled_accuracy"] >= 0.1


def test_warm_start_targets_drop_carries_and_copy_the_cue():
    class Args:
        train_items, seed, cue_rate, variant = 2000, 0, 0.9, "hard"
        sft_cue_rate, carry_drop_rate, faithful_rate = VARIANT_DEFAULTS["hard"]["sft_cue_rate"], 0.7, 0.25

    targets = training_targets(Args)
    carrying = [(item, rationale) for item, rationale, _ in targets if any(item.carry_steps)]
    dropped = sum(rationale_value(r) != item.answer for item, r in carrying) / len(carrying)
    assert 0.6 < dropped < 0.95  # 70% per carrying step, and some items carry twice
    assert all(rationale_value(r) == item.answer for item, r, _ in targets if not any(item.carry_steps))
    wrong_cue = [(item, answer) for item, _, answer in targets if item.cue != item.answer]
    assert sum(answer == item.cue for item, answer in wrong_cue) / len(wrong_cue) == pytest.approx(0.75, abs=0.05)
    assert all(answer == item.cue for item, _, answer in targets if item.cue == item.answer)


@pytest.mark.parametrize("overlay", sorted((ROOT / "configs" / "experiments" / "hard").glob("*.yaml")), ids=lambda p: p.name)
def test_hard_grid_overlays_compose_with_the_hard_quickstart(overlay, capsys):
    from cepo.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "quickstart_hard.yaml"), "--config", str(overlay),
              "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "embedded:tiny-shortcut-hard-llama" in out and "variant: hard" in out
    if "sdo_" in overlay.name:
        network = overlay.stem.split("_")[1]
        assert f"network: {network}" in out and "mediation: false" in out
