"""End to end through the CLI on the CPU, from the real quickstart config with small sizes."""

from pathlib import Path

import pytest
from lightning import Callback
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cepo.cli import main
from cepo.policy.loading import resolve_model_path
from helpers.runs import small_run_args



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


@pytest.mark.slow
def test_resume_continues_counters_and_data_stream(tmp_path):
    first = main(["fit", *small_run_args(tmp_path, "--trainer.max_steps", "2")])
    ckpt = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    seen: list[int] = []

    class RecordBatches(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch.index)

    import cepo.cli as cli_module

    resumed = cli_module.CEPOCLI(
        cli_module.CEPOModule, cli_module.PromptDataModule, subclass_mode_model=True, auto_configure_optimizers=False,
        trainer_defaults={"callbacks": [RecordBatches()], "num_sanity_val_steps": 0, "check_val_every_n_epoch": None,
                          "max_epochs": -1},
        args=["fit", *small_run_args(tmp_path, "--trainer.max_steps", "4"), "--ckpt_path", str(ckpt)],
    )
    assert seen == [2, 3], "the resumed run must read the stream from where the checkpoint left it"
    assert resumed.model.rollout_step == 4 and resumed.trainer.global_step == 4
    state = torch.load(Path(resumed.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["cepo"]["rollout_step"] == 4
    assert state["PromptDataModule"]["next_batch"] == 4


def test_batch_arithmetic_is_checked_with_a_readable_message(tmp_path):
    with pytest.raises(ValueError, match="prompts_per_step.*group_size.*mini_batch_size"):
        main(["fit", *small_run_args(tmp_path, "--model.init_args.mini_batch_size", "5")])


@pytest.mark.slow
def test_validate_with_several_samples_reports_mean_accuracy_and_pass_at_n(tmp_path):
    cli = main(["validate", *small_run_args(tmp_path), "--model.init_args.eval_num_samples", "3",
                "--model.init_args.generation.eval_temperature", "1.0"])
    metrics = cli.trainer.callback_metrics
    assert float(metrics["val/flipped/n"]) == 24  # 8 prompts x 3 samples
    assert float(metrics["val/flipped/pass_at_n"]) >= float(metrics["val/flipped/accuracy"]) - 1e-9


def test_several_greedy_samples_are_refused(tmp_path):
    with pytest.raises(ValueError, match="eval_temperature"):
        main(["validate", *small_run_args(tmp_path), "--model.init_args.eval_num_samples", "3"])


@pytest.mark.slow
def test_starting_from_an_adapter_uses_its_frozen_copy_as_reference(tmp_path):
    first = main(["fit", *small_run_args(tmp_path / "first")])
    adapter = Path(first.trainer.log_dir) / "adapter"
    second = main(["fit", *small_run_args(tmp_path / "second"), "--model.init_args.policy.adapter_path", str(adapter)])
    module = second.model
    assert module.has_reference_adapter
    ids = torch.tensor([[30, 31, 32, 33, 34]])
    start = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(resolve_model_path("embedded:tiny-shortcut-llama")), str(adapter)
    ).eval()
    module.policy.eval()
    with torch.no_grad():
        with module.reference_model() as reference:
            reference_logits = reference(input_ids=ids).logits
        # The reference is the starting adapter, not the base model, and it stayed frozen while the
        # trained copy moved on.
        torch.testing.assert_close(reference_logits, start(input_ids=ids).logits)
        assert not torch.allclose(module.policy(input_ids=ids).logits, reference_logits)
    frozen = [p for n, p in module.policy.named_parameters() if ".reference." in n]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert any(p.requires_grad for n, p in module.policy.named_parameters() if ".default." in n)
