"""Half precision end to end on the CPU: ``bf16-mixed`` and ``bf16-true`` fit and validate the quickstart.

The first optimisation pass over a rollout compares the stored (no-grad) log-probs with the gradient pass
at identical weights, so its ratio must be exactly 1 whatever the precision; the reference (adapter
disabled, LoRA B = 0) must give a KL of exactly 0 at step 0.
"""

from pathlib import Path

import pytest
import torch

import cepo.rl.grpo as grpo_math
from cepo.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def run_args(tmp_path, precision: str, dtype: str) -> list[str]:
    return [
        "--config", QUICKSTART,
        "--trainer.precision", precision,
        "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--data.prompts_per_step", "4",
        "--data.eval_batch_size", "8",
        "--model.init_args.policy.dtype", dtype,
        "--model.init_args.group_size", "4",
        "--model.init_args.micro_batch_size", "16",
        "--model.init_args.optim.lr", "0.01",
        "--model.init_args.num_iterations", "2",  # old log-probs come from their own no-grad pass
    ]


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "dtype"), [("bf16-mixed", "float32"), ("bf16-true", "bfloat16")])
def test_half_precision_fit_and_validate(tmp_path, monkeypatch, precision, dtype):
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    original_surrogate, original_kl = grpo_math.clipped_surrogate, grpo_math.k3_kl

    def recording_surrogate(logp, old_logp, *args, **kwargs):
        calls.append(("ratio", torch.exp(logp.detach() - old_logp.detach())))
        return original_surrogate(logp, old_logp, *args, **kwargs)

    def recording_kl(logp, ref_logp):
        calls.append(("kl", original_kl(logp.detach(), ref_logp.detach())))
        return original_kl(logp, ref_logp)

    monkeypatch.setattr(grpo_math, "clipped_surrogate", recording_surrogate)
    monkeypatch.setattr(grpo_math, "k3_kl", recording_kl)
    cli = main(["fit", *run_args(tmp_path, precision, dtype)])
    ratios = [value for kind, value in calls if kind == "ratio"]
    kls = [value for kind, value in calls if kind == "kl"]
    # 2 rollouts x 2 iterations, one micro-batch of 16 each
    assert len(ratios) == 4 and len(kls) == 4
    assert all(torch.isfinite(r).all() for r in ratios)
    assert torch.equal(ratios[0], torch.ones_like(ratios[0])), "first iteration: same weights, ratio must be 1"
    assert torch.equal(kls[0], torch.zeros_like(kls[0])), "step 0: policy equals reference, KL must be 0"
    lora = [p for n, p in cli.model.policy.named_parameters() if "lora_B" in n]
    assert all(torch.isfinite(p).all() for p in lora) and any(p.abs().sum() > 0 for p in lora)
    if precision == "bf16-true":
        assert all(p.dtype == torch.bfloat16 for p in lora)
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    val = main(["validate", *run_args(tmp_path, precision, dtype), "--ckpt_path", str(ckpt)])
    accuracy = float(val.trainer.callback_metrics["val/accuracy"])
    assert 0.0 <= accuracy <= 1.0


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_half_precision_plugin_passes_a_prompt_batch_through_untouched(precision):
    from lightning.pytorch.plugins.precision import HalfPrecision

    from cepo.data.datamodule import PromptBatch
    from cepo.data.example import Example

    batch = PromptBatch([Example("What is 2+2?", ("4",))], index=3, source="toy")
    plugin = HalfPrecision(precision)
    converted = plugin.convert_input(batch)
    assert converted == batch and converted.examples[0] is batch.examples[0]


@pytest.mark.slow
def test_loss_scaled_16_mixed_clips_and_logs_the_true_gradient_norm(tmp_path):
    # On a GPU, 16-mixed scales the loss by 2^16 and Lightning unscales the gradients only inside
    # optimizer.step(); a GradScaler on the CPU reproduces that. Norm and clip must see true gradients.
    from lightning.pytorch.plugins.precision import MixedPrecision

    import cepo.cli

    def fit(plugins, extra):
        original = cepo.cli.CEPOCLI.__init__

        def with_plugins(self, *args, trainer_defaults=None, **kwargs):
            original(self, *args, trainer_defaults={**(trainer_defaults or {}), "plugins": plugins}, **kwargs)

        cepo.cli.CEPOCLI.__init__ = with_plugins
        try:
            cli = main(["fit", "--config", QUICKSTART, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
                        "--trainer.enable_progress_bar", "false",
                        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), *extra])
        finally:
            cepo.cli.CEPOCLI.__init__ = original
        return float(cli.trainer.callback_metrics["train/grad_norm"])

    reference = fit([], [])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaled = fit([MixedPrecision("16-mixed", "cpu", scaler=scaler)], ["--trainer.precision", "null"])
    assert reference > 0
    assert 0.5 < scaled / reference < 2.0, f"grad norm {scaled} under loss scaling vs {reference} in float32"
