"""Preemption: SIGTERM mid-run writes the newest state to last.ckpt and exits 143; resuming from it ends
with exactly the weights of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def fit_command(save_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "cepo", "fit", "--config", QUICKSTART,
        "--trainer.max_steps", "5", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(save_dir),
        "--data.prompts_per_step", "4", "--data.eval_batch_size", "8",
        "--model.init_args.group_size", "4", "--model.init_args.micro_batch_size", "8",
        "--trainer.num_sanity_val_steps", "0",
        "--model.init_args.mini_batch_size", "8",  # two optimiser steps per rollout: optimiser state matters
        "--model.init_args.generation.max_new_tokens", "24", "--model.init_args.optim.lr", "0.01",
        *extra,
    ]


def environment() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_dir(save_dir: Path, version: int = 0) -> Path:
    return save_dir / "quickstart" / f"version_{version}"


def adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_exits_143_and_resume_matches_an_uninterrupted_run(tmp_path):
    straight = subprocess.run(fit_command(tmp_path / "straight"), env=environment(), cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]

    marker = tmp_path / "step3.marker"
    pause = tmp_path / "pause.yaml"
    pause.write_text(
        "trainer:\n  callbacks:\n    - class_path: helpers.preemption.PauseForSignalAtStep\n"
        f"      init_args: {{step: 3, marker: '{marker}'}}\n"
    )
    process = subprocess.Popen(fit_command(tmp_path / "preempted", "--config", str(pause)), env=environment(),
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), process.communicate()[1][-3000:] if process.poll() is not None else "no marker"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]

    last = run_dir(tmp_path / "preempted") / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == 3 and state["cepo"]["rollout_step"] == 3, "last.ckpt must hold step 3, not 2"
    assert not (run_dir(tmp_path / "preempted") / "adapter").exists(), "an interrupted fit is not finished"

    resumed = subprocess.run(fit_command(tmp_path / "preempted", "--ckpt_path", str(last)), env=environment(),
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the resumed fit logs to the next version folder
    expected, got = adapter_weights(run_dir(tmp_path / "straight")), adapter_weights(run_dir(tmp_path / "preempted", 1))
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=f"{name} differs after resume")
    final = torch.load(run_dir(tmp_path / "preempted", 1) / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["cepo"]["rollout_step"] == 5


def test_sigterm_outside_fit_exits_143_without_writing_a_checkpoint(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cepo.training.checkpointing import LatestCheckpoint

    saved = []
    trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.VALIDATING), sanity_checking=False, global_step=7,
                              checkpoint_callback=None, log_dir=str(tmp_path), default_root_dir=str(tmp_path),
                              loggers=[], strategy=SimpleNamespace(broadcast=lambda obj: obj),
                              save_checkpoint=lambda path, weights_only=None: saved.append(path))
    callback = LatestCheckpoint()
    sigterm = SIGTERMException()
    callback.on_exception(trainer, None, sigterm)
    assert sigterm.code == 143 and saved == []
    for fn in (TrainerFn.VALIDATING, TrainerFn.FITTING):  # any other error: no checkpoint, no exit status
        trainer.state.fn = fn
        other = ValueError("not a preemption")
        callback.on_exception(trainer, None, other)
        assert saved == [] and not hasattr(other, "code")
    callback.on_exception(trainer, None, SIGTERMException())
    assert saved == [str(tmp_path / "checkpoints" / "last.ckpt")]


@pytest.mark.slow
def test_an_ordinary_error_during_fit_is_raised_as_itself_and_writes_no_checkpoint(tmp_path):
    # Only SIGTERM is a preemption: a bug at step 1 must end the process with its own traceback and status
    # 1, not be saved as a resumable state and reported as "terminated" (143).
    failing = tmp_path / "raise.yaml"
    failing.write_text("trainer:\n  callbacks:\n    - class_path: helpers.preemption.RaiseAtStep\n"
                       "      init_args: {step: 1}\n")
    result = subprocess.run(fit_command(tmp_path / "runs", "--config", str(failing), "--trainer.max_steps", "3"),
                            env=environment(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "ValueError: an ordinary error at rollout step 1" in result.stderr
    assert not list((tmp_path / "runs").rglob("*.ckpt")), "an error is not a preemption: nothing to resume"
