"""Data parallelism, measured end to end: two CPU processes (gloo, Lightning's ``ddp`` strategy) with P
prompts each end with the LoRA weights of one process with 2P prompts, for GRPO and the CE-PO preset.

The rollouts are made equal with ``generation.sampling_seed``: each prompt's samples are drawn from a
stream keyed by its text and the step, not by the device's random stream, so both runs sample the same
completions. The data stream gives the single process exactly the prompts the two ranks read together
(rank 0 the first half of each global batch, rank 1 the second). Everything else must then agree: the
group advantages, the loss normalisers summed over devices, the gradient all-reduce, clipping, AdamW.
Two rollouts with two passes each (``num_iterations`` 2), so the second pass sees ratios away from 1.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cepo.cli import main

ROOT = Path(__file__).resolve().parents[1]
M = "--model.init_args."
PRESETS = {"grpo": [], "cepo": ["--config", str(ROOT / "configs" / "rewards" / "cepo.yaml")]}
TOLERANCE = 1e-6  # float32; the LoRA B weights reach ~1e-3 after two steps (checked below)


def args(save_dir: Path, preset: str, devices: int, prompts_per_step: int) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), *PRESETS[preset],
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
        *(["--trainer.strategy", "ddp"] if devices > 1 else []),
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(save_dir),
        "--data.prompts_per_step", str(prompts_per_step),
        f"{M}group_size", "4", f"{M}micro_batch_size", "8", f"{M}num_iterations", "2",
        f"{M}generation.max_new_tokens", "16", f"{M}generation.sampling_seed", "0",
    ]


def adapter(save_dir: Path) -> dict[str, torch.Tensor]:
    (path,) = save_dir.rglob("adapter/adapter_model.safetensors")
    return load_file(str(path))


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_two_ddp_processes_end_with_the_lora_weights_of_one_process(preset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    two = subprocess.run([sys.executable, "-m", "cepo", *args(tmp_path / "two", preset, 2, 2)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "Starting with 2 processes" in two.stderr + two.stdout
    main(args(tmp_path / "one", preset, 1, 4))
    single, ddp = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert single.keys() == ddp.keys()
    difference = max(float((single[k] - ddp[k]).abs().max()) for k in single)
    moved = max(float(v.abs().max()) for k, v in single.items() if "lora_B" in k)  # B starts at 0
    print(f"{preset}: max |LoRA weight difference| {difference:.3g}, max |lora_B| {moved:.3g}")
    assert moved > 100 * TOLERANCE, "the runs trained, so equal weights are not just the initial ones"
    assert difference <= TOLERANCE, f"max |LoRA weight difference| = {difference:.3g}"
