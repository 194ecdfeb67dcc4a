"""Command lines for small end-to-end runs of the quickstart config, shared by the CLI tests."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def small_run_args(tmp_path: Path, *extra: str, configs: tuple[str, ...] = ()) -> list[str]:
    """The quickstart, then ``configs`` (overlays), shrunk to 2 rollouts of 4 prompts x 4 samples with one
    validation batch at step 2 (none at step 0), logging every step into ``tmp_path/runs``; ``extra`` options come last
    and so override any of these."""
    overlays = [arg for config in configs for arg in ("--config", str(config))]
    return [
        "--config", QUICKSTART, *overlays,
        "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.limit_predict_batches", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--data.prompts_per_step", "4",
        "--data.eval_batch_size", "8",
        "--model.init_args.group_size", "4",
        "--model.init_args.micro_batch_size", "8",
        "--model.init_args.optim.lr", "0.01",
        *extra,
    ]


def copy_adapter_with_nan(source, target):
    """Copy the adapter folder ``source`` to ``target`` with one NaN planted in its first LoRA B matrix;
    returns the poisoned tensor's name."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(target / "adapter_model.safetensors")
    name = sorted(k for k in weights if "lora_B" in k)[0]
    weights[name][0, 0] = float("nan")
    save_file(weights, target / "adapter_model.safetensors")
    return name
