"""Checkpoint files and folders are written in one step: an interrupted write leaves the previous version
complete and loadable, and the temporary copy lives beside the target, never in the system temp folder
(which may be on another filesystem, where a rename becomes a copy that a kill can cut short)."""

import os
import tempfile
from pathlib import Path

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import cepo.training.checkpointing as checkpointing
from cepo import GRPO
from cepo.policy.loading import PolicyConfig, resolve_model_path
from cepo.training.checkpointing import AtomicCheckpointIO, LatestCheckpoint, atomic_folder, atomic_save
from cepo.training.export import CEPOTrainer, save_merged


class Interrupted(Exception):
    """Stands for a kill in the middle of a write."""


@pytest.fixture()
def tmpdir_elsewhere(tmp_path, monkeypatch):
    """The system temp folder points at a folder that does not exist: any write staged there fails."""
    elsewhere = tmp_path / "no-such-temp-folder"
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    return elsewhere


@pytest.fixture()
def replaced(monkeypatch):
    """Every (source, target) that os.replace / os.rename moves."""
    moves = []
    for name in ("replace", "rename"):
        original = getattr(os, name)

        def spy(src, dst, *args, _original=original, **kwargs):
            moves.append((Path(src), Path(dst)))
            return _original(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, name, spy)
    return moves


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


# ---------------------------------------------------------------------------------------------- files
def test_last_ckpt_is_staged_beside_itself_whatever_tmpdir_says(tmp_path, tmpdir_elsewhere, replaced):
    trainer = CEPOTrainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=str(tmp_path), callbacks=[LatestCheckpoint()], limit_val_batches=0)
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    trainer.fit(BoringModel())
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2
    # last.ckpt and Lightning's own top-k checkpoint: both renamed into place from their own folder
    assert {dst.name for _, dst in replaced} == {"last.ckpt", "epoch=0-step=2.ckpt"}
    assert all(src.parent == dst.parent == last.parent for src, dst in replaced)
    assert not tmpdir_elsewhere.exists()
    assert siblings(last) == ["epoch=0-step=2.ckpt", "last.ckpt"], "no temporary file is left behind"


def test_lightning_default_trainer_stages_in_tmpdir_which_is_why_cepo_replaces_its_writer(tmp_path, tmpdir_elsewhere):
    # The failure this module guards against: Lightning's writer stages the file in the system temp folder.
    trainer = Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path), callbacks=[LatestCheckpoint()], limit_val_batches=0)
    with pytest.raises(OSError):
        trainer.fit(BoringModel())


def test_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    last = tmp_path / "last.ckpt"
    atomic_save({"step": torch.tensor(1)}, last)
    assert oct(last.stat().st_mode & 0o777) == oct(0o666 & ~checkpointing._umask())

    def half_then_kill(obj, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise Interrupted

    monkeypatch.setattr(checkpointing.torch, "save", half_then_kill)
    with pytest.raises(Interrupted):
        AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(2)}, last)
    assert torch.load(last, weights_only=True)["step"] == 1
    assert siblings(last) == ["last.ckpt"]


# ---------------------------------------------------------------------------------------------- folders
def test_atomic_folder_replaces_a_folder_whole_on_either_swap(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    for version, exchange in ((1, True), (2, True), (3, False)):  # False: no renameat2 (macOS, some filesystems)
        if not exchange:
            monkeypatch.setattr(checkpointing, "_exchange", lambda a, b: False)
        with atomic_folder(target) as staging:
            assert staging.parent == target.parent and staging != target
            (staging / "weights").write_text(str(version))
            if version == 1:
                (staging / "only-in-v1").write_text("stale")
        assert (target / "weights").read_text() == str(version)
        assert (target / "only-in-v1").exists() is (version == 1), "the new folder replaces, never merges"
        assert siblings(target) == ["adapter"]


def test_leftovers_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    import socket
    import subprocess
    import sys

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead, alive, host = int(finished.stdout), os.getppid(), socket.gethostname()
    for name in ("last.ckpt", "adapter"):
        target = tmp_path / name
        killed = tmp_path / f".{name}.{host}-{dead}.abc123.tmp"
        killed_folder = tmp_path / f".{name}.{host}-{dead}.def456.partial"
        running = tmp_path / f".{name}.{host}-{alive}.ghi789.partial"
        other_host = tmp_path / f".{name}.elsewhere-{dead}.jkl012.tmp"
        other_target = tmp_path / f".other.{host}-{dead}.mno345.tmp"
        killed.write_text("half a checkpoint")
        killed_folder.mkdir()
        (killed_folder / "adapter_model.safetensors").write_text("half")
        for kept in (running, other_host, other_target):
            kept.mkdir() if kept.suffix == ".partial" else kept.write_text("kept")
        if name == "adapter":
            with atomic_folder(target) as staging:
                (staging / "weights").write_text("1")
        else:
            atomic_save({"step": 1}, target)
        assert target.exists()
        assert not killed.exists() and not killed_folder.exists()
        assert running.exists() and other_host.exists() and other_target.exists()


@pytest.fixture(scope="module")
def module():
    grpo = GRPO(policy=PolicyConfig(name_or_path="embedded:tiny-shortcut-llama"))
    grpo.configure_model()
    return grpo


def lora_b(module):
    return [p for n, p in module.policy.named_parameters() if "lora_B" in n]


def test_interrupted_adapter_write_keeps_the_previous_adapter_loadable(module, tmp_path, tmpdir_elsewhere,
                                                                       monkeypatch):
    target = tmp_path / "run" / "step4-acc0.500-adapter"
    with torch.no_grad():
        for p in lora_b(module):
            p.fill_(0.25)
    module.export_adapter(str(target))
    written = load_file(str(target / "adapter_model.safetensors"))
    staged = []

    def kill_after_the_weights(folder, *args, **kwargs):
        staged.append(Path(folder))
        raise Interrupted  # the weights are written, the tokenizer is not

    with torch.no_grad():
        for p in lora_b(module):
            p.fill_(-1.0)
    monkeypatch.setattr(module.tokenizer, "save_pretrained", kill_after_the_weights)
    with pytest.raises(Interrupted):
        module.export_adapter(str(target))
    assert staged[0].parent == target.parent, "staged beside the target, not in TMPDIR"
    assert siblings(target) == [target.name], "the partial folder is removed"
    after = load_file(str(target / "adapter_model.safetensors"))
    assert after.keys() == written.keys() and all(torch.equal(after[k], written[k]) for k in written)
    assert all(float(v.abs().max()) == 0.25 for k, v in after.items() if "lora_B" in k)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("embedded:tiny-shortcut-llama"))
    loaded = PeftModel.from_pretrained(base, str(target))
    assert all(float(p.abs().max()) == 0.25 for n, p in loaded.named_parameters() if "lora_B" in n)
    assert (target / "tokenizer_config.json").is_file()


def test_interrupted_merged_export_keeps_the_previous_model_loadable(module, tmp_path, monkeypatch):
    target = tmp_path / "merged"
    with torch.no_grad():
        for p in lora_b(module):
            p.fill_(0.01)
    save_merged(module.policy, module.tokenizer, target, "# first\n")
    first = AutoModelForCausalLM.from_pretrained(str(target)).state_dict()
    with torch.no_grad():
        for p in lora_b(module):
            p.fill_(0.5)
    monkeypatch.setattr(module.tokenizer, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(Interrupted()))
    with pytest.raises(Interrupted):
        save_merged(module.policy, module.tokenizer, target, "# second\n")
    assert (target / "README.md").read_text() == "# first\n"
    again = AutoModelForCausalLM.from_pretrained(str(target)).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert siblings(target) == ["merged"]
