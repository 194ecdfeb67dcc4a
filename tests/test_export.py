"""Merged export and adapters beside checkpoints: what leaves cepo must compute what cepo trained."""

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cepo.cli import main
from cepo.policy.loading import resolve_model_path
from cepo.training.export import AdapterCheckpoint, merged_state_dict

from conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
CEPO_PRESET = str(ROOT / "configs" / "rewards" / "cepo.yaml")


def run_args(tmp_path, *extra):
    return [
        "--config", QUICKSTART,
        "--trainer.val_check_interval", "1",
        "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--data.prompts_per_step", "4",
        "--data.eval_batch_size", "8",
        "--model.init_args.group_size", "4",
        "--model.init_args.micro_batch_size", "8",
        "--model.init_args.optim.lr", "0.02",
        *extra,
    ]


def sequence_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids_t | ids_<t) for every t > 0, float32, eval mode."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


IDS = torch.tensor([[5, 30, 31, 32, 7, 33, 34, 12, 40, 41], [9, 8, 7, 6, 5, 4, 3, 2, 1, 40]])


def test_merged_state_dict_reproduces_the_adapted_model_and_leaves_it_untouched(char_tokenizer):
    base = make_tiny_llama(len(char_tokenizer))
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)  # B starts at zero; make the update non-trivial
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    state = merged_state_dict(policy)
    assert not any("lora_" in k or "base_layer" in k for k in state)
    plain = make_tiny_llama(len(char_tokenizer), seed=123)  # different weights: all must come from `state`
    plain.load_state_dict(state, strict=True)
    adapted = sequence_logprobs(policy, IDS)
    torch.testing.assert_close(sequence_logprobs(plain, IDS), adapted, rtol=1e-5, atol=1e-5)
    assert (sequence_logprobs(plain, IDS) - sequence_logprobs(make_tiny_llama(len(char_tokenizer)), IDS)).abs().max() > 1e-3
    for key, value in policy.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by the merge"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three rollouts with the CE-PO preset, validating after each, keeping the 2 best checkpoints, merged
    model written at the end."""
    tmp = tmp_path_factory.mktemp("export_run")
    cli = main(["fit", *run_args(tmp, "--config", CEPO_PRESET, "--trainer.max_steps", "3",
                                 "--checkpoint.save_top_k", "2", "--merge.at_fit_end", "true")])
    return cli, tmp


@pytest.mark.slow
def test_merged_model_at_fit_end_loads_plainly_and_matches_the_trained_policy(run):
    cli, _ = run
    merged = Path(cli.trainer.log_dir) / "merged"
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    assert not any("lora" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(sequence_logprobs(model, IDS), sequence_logprobs(cli.model.policy, IDS), rtol=1e-5, atol=1e-5)
    card = (merged / "README.md").read_text()
    assert "embedded:tiny-shortcut-llama" in card and "ShortcutTask(split='train'" in card
    assert "coherence_zx: weight 0.1" in card and "accuracy: weight 0.7" in card and "p = 0.2" in card
    last = [json.loads(line) for line in (Path(cli.trainer.log_dir) / "val_results.jsonl").read_text().splitlines()][-3:]
    assert all(row["rollout_step"] == 3 for row in last)
    for row in last:  # the card's table holds the final validation
        assert f"| {row['dataset']} | {int(row['n'])} | {row['accuracy']:.3f} |" in card


@pytest.mark.slow
def test_adapters_sit_beside_the_kept_checkpoints(run):
    cli, _ = run
    folder = Path(cli.trainer.checkpoint_callback.dirpath)
    kept = sorted(folder.glob("step*.ckpt"))
    adapters = sorted(folder.glob("step*-adapter"))
    assert len(kept) == 2  # three validations, top 2 kept: no adapter outlives its checkpoint
    assert [a.name for a in adapters] == [f"{c.stem}-adapter" for c in kept]
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    other = next(c for c in kept if c != best)
    cli.trainer.checkpoint_callback._remove_checkpoint(cli.trainer, str(other))  # what top-k eviction calls
    assert not other.exists() and not AdapterCheckpoint.adapter_dir(other).exists()
    assert best.exists() and AdapterCheckpoint.adapter_dir(best).is_dir()
    state = torch.load(best, weights_only=False)["state_dict"]
    saved = load_file(str(AdapterCheckpoint.adapter_dir(best) / "adapter_model.safetensors"))
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert len(saved) == len(lora)
    for key, value in lora.items():  # PEFT drops the adapter name: ...lora_A.default.weight -> ...lora_A.weight
        plain = key.removeprefix("policy.").replace(".default.", ".")
        torch.testing.assert_close(saved[plain], value, rtol=0, atol=0)


@pytest.mark.slow
def test_export_command_on_a_checkpoint(run, tmp_path):
    cli, tmp = run
    best = cli.trainer.checkpoint_callback.best_model_path
    exported = main(["export", *run_args(tmp, "--config", CEPO_PRESET), "--ckpt_path", best])
    out = Path(best).with_name(Path(best).stem + "-merged")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    # Reference: the best checkpoint's adapter on a fresh base model, through plain PEFT.
    fresh = AutoModelForCausalLM.from_pretrained(resolve_model_path("embedded:tiny-shortcut-llama"))
    adapted = PeftModel.from_pretrained(fresh, str(AdapterCheckpoint.adapter_dir(best)))
    torch.testing.assert_close(sequence_logprobs(model, IDS), sequence_logprobs(adapted, IDS), rtol=1e-5, atol=1e-5)
    step = torch.load(best, weights_only=False)["cepo"]["rollout_step"]
    assert f"trained for {step} rollout steps" in (out / "README.md").read_text()
    assert f"At rollout step {step}" in (out / "README.md").read_text()
    assert exported.model.rollout_step == step
    with pytest.raises(ValueError, match="--ckpt_path"):
        main(["export", *run_args(tmp)])
