"""``policy.name_or_path: config:FOLDER``: a random-weight policy from a config.json and a shipped word
tokenizer, as the prepared GPU run (benchmarks/gpu_run.sh) uses it."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_step  # noqa: E402
import memory_model  # noqa: E402

from cepo.policy.loading import PolicyConfig, load_policy, load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    gpu_step.write_model(folder, "tiny")
    return folder


def test_config_folder_builds_the_shape_with_seeded_random_weights(tiny_folder):
    config = PolicyConfig(name_or_path=f"config:{tiny_folder}", dtype="float32")
    torch.manual_seed(0)
    first, has_reference = load_policy(config)
    torch.manual_seed(0)
    second, _ = load_policy(config)
    base = first.get_base_model()
    assert not has_reference and base.config.hidden_size == gpu_step.TINY["hidden_size"]
    shape = memory_model.Shape.from_config(gpu_step.TINY)
    frozen = sum(p.numel() for name, p in base.named_parameters() if "lora_" not in name)
    assert frozen == memory_model.base_parameters(shape)
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name
    assert sum(p.numel() for p in first.parameters() if p.requires_grad) == memory_model.lora_parameters(shape, 16)


def test_config_folder_tokenizer_knows_the_task_text(tiny_folder):
    tokenizer = load_tokenizer(PolicyConfig(name_or_path=f"config:{tiny_folder}"))
    ids = tokenizer("Q: 7-7+2 hint: 2 <answer> 12 </answer>", add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == "Q : 7 - 7 + 2 hint : 2 < answer > 12 </ answer >"
    assert len(tokenizer) == gpu_step.TINY["vocab_size"]  # every id the model can sample decodes to a word
    assert tokenizer.decode([gpu_step.TINY["vocab_size"] - 1]) == f"w{gpu_step.TINY['vocab_size'] - 1}"


def test_config_prefix_without_a_config_json_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="--write-model"):
        load_tokenizer(PolicyConfig(name_or_path=f"config:{tmp_path}"))


def test_gpu_fit_config_composes_with_the_quickstart(tiny_folder, tmp_path, monkeypatch):
    from cepo import CEPOModule, CoherenceRewardCallback, PromptDataModule
    from cepo.cli import CEPOCLI

    monkeypatch.setattr(sys, "argv", ["cepo"])
    cli = CEPOCLI(CEPOModule, PromptDataModule, subclass_mode_model=True, auto_configure_optimizers=False, run=False,
                  args=["--config", str(ROOT / "configs" / "quickstart.yaml"),
                        "--config", str(ROOT / "configs" / "experiments" / "gpu_1.5b_cepo.yaml"),
                        "--model.init_args.policy.name_or_path", f"config:{tiny_folder}",
                        "--trainer.accelerator", "cpu", "--trainer.logger.init_args.save_dir", str(tmp_path)])
    coherence = [cb for cb in cli.trainer.callbacks if isinstance(cb, CoherenceRewardCallback)]
    assert len(coherence) == 1
    assert coherence[0].scorer.micro_batch_size == "auto" and coherence[0].scorer.num_counterfactuals == 4
    assert coherence[0].weights == {"zx": 0.1, "xy": 0.1, "zy": 0.1}
    assert cli.model.reward_p == 0.2 and cli.trainer.precision == "bf16-mixed" and cli.trainer.max_steps == 3
    assert cli.model.policy_config.name_or_path == f"config:{tiny_folder}"
    assert cli.model.policy_config.dtype == "float32"  # float32 weights: the scorer runs in float32
