"""End to end through the CLI on the CPU, from the real quickstart config with small sizes."""

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cepo.cli import main
from cepo.policy.loading import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def small_run_args(tmp_path, *extra):
    return [
        "--config", QUICKSTART,
        "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--data.prompts_per_step", "4",
        "--data.eval_batch_size", "8",
        "--model.init_args.group_size", "4",
        "--model.init_args.micro_batch_size", "8",
        "--model.init_args.optim.lr", "0.01",
        *extra,
    ]


def base_weights() -> dict[str, torch.Tensor]:
    return load_file(str(Path(resolve_model_path("embedded:tiny-shortcut-llama")) / "model.safetensors"))


def assert_only_lora_changed(policy) -> None:
    reference = base_weights()
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "LoRA B starts at zero; a step must move it"
    base = policy.get_base_model()
    for name, tensor in reference.items():
        param = base.get_parameter(name.replace(".weight", ".base_layer.weight")) if any(
            f"{name.rsplit('.', 1)[0]}.base_layer" in n for n, _ in base.named_parameters()
        ) else base.get_parameter(name)
        torch.testing.assert_close(param.detach(), tensor, rtol=0, atol=0, msg=f"base weight {name} changed")


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fit_then_validate(tmp_path, checkpointing):
    cli = main(["fit", *small_run_args(tmp_path, "--model.init_args.policy.gradient_checkpointing", str(checkpointing).lower())])
    assert_only_lora_changed(cli.model.policy)
    log_dir = Path(cli.trainer.log_dir)
    adapter = log_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    # The exported adapter loads with plain PEFT and reproduces the trained policy's logits.
    fresh = AutoModelForCausalLM.from_pretrained(resolve_model_path("embedded:tiny-shortcut-llama"))
    loaded = PeftModel.from_pretrained(fresh, str(adapter)).eval()
    ids = torch.tensor([[30, 31, 32, 33, 34]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, cli.model.policy.eval()(input_ids=ids).logits)
    results = (log_dir / "val_results.jsonl").read_text().splitlines()
    assert len(results) == 3  # one row per validation split
    ckpt = log_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, weights_only=False)
    assert state["cepo"]["rollout_step"] == 2
    assert all("lora_" in k for k in state["state_dict"]), "checkpoints hold trainable weights only"
    val = main(["validate", *small_run_args(tmp_path), "--ckpt_path", str(ckpt)])
    metrics = val.trainer.callback_metrics
    for split in ("in_distribution", "flipped", "edited"):
        assert 0.0 <= float(metrics[f"val/{split}/accuracy"]) <= 1.0
