"""What a checkpoint must record to be read back right, and the checks made when it is read.

A cepo checkpoint holds only the trainable LoRA weights; the base model and the LoRA layout come from the
configuration of the run that loads it. A different ``lora.alpha`` would silently rescale the learned
update, a different base model would apply it to other weights, so the checkpoint records them
(:func:`policy_record`) and a mismatch is refused naming the option and both values
(:func:`check_policy_record`). Weights that are not finite are refused at load, naming the tensor
(:func:`check_finite`), and a file that is not a checkpoint at all is refused before torch reads it
(:func:`check_checkpoint_file`).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from cepo.policy.loading import same_model

TRAINED_ADAPTER = "default"
# Lightning's ckpt_path shortcuts, resolved by the Trainer itself.
CKPT_PATH_SHORTCUTS = ("last", "best", "hpc", "registry")


def policy_record(policy, config) -> dict[str, Any]:
    """The settings of the trained adapter that loading must reproduce: the base model, the effective
    LoRA rank, alpha and target modules (the starting adapter's, when the run started from one) and the
    starting adapter (the reference policy of a resumed run)."""
    lora = policy.peft_config[TRAINED_ADAPTER]
    targets = lora.target_modules
    return {
        "name_or_path": config.name_or_path,
        "lora_r": int(lora.r),
        "lora_alpha": float(lora.lora_alpha),
        "lora_target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else str(targets),
        "adapter_path": config.adapter_path,
    }


# (record key, option to name, needed by: "all" stages or only "fit" (resuming training))
_CHECKED = (
    ("name_or_path", "model.policy.name_or_path", "all"),
    ("lora_r", "model.policy.lora.r", "all"),
    ("lora_alpha", "model.policy.lora.alpha", "all"),
    ("lora_target_modules", "model.policy.lora.target_modules", "all"),
    ("adapter_path", "model.policy.adapter_path", "fit"),
)


def same_folder(a: str | None, b: str | None) -> bool:
    """Whether two paths (or two Nones) name the same folder."""
    if a is None or b is None:
        return a == b
    return a == b or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def check_policy_record(saved: Mapping[str, Any], current: Mapping[str, Any], *, resuming: bool) -> None:
    """Refuse a checkpoint whose recorded policy settings differ from this run's, naming each option with
    the checkpoint's value and this run's. ``resuming``: also the settings only training depends on (the
    starting adapter, which is the reference of the KL term)."""
    problems = []
    for key, option, needed_by in _CHECKED:
        if key not in saved or (needed_by == "fit" and not resuming):
            continue
        ours, theirs = current.get(key), saved[key]
        equal = (same_model(theirs, ours) if key == "name_or_path" else same_folder(theirs, ours)
                 if key == "adapter_path" else theirs == ours)
        if not equal:
            problems.append(f"{option}: the checkpoint's is {theirs!r}, this run's is {ours!r}")
    if not problems:
        return
    adapter_note = (" (a run started from policy.adapter_path takes its LoRA settings from that adapter)"
                    if current.get("adapter_path") else "")
    raise ValueError(
        "the checkpoint was trained with other policy settings: " + "; ".join(problems) + ". Load it with "
        "the settings it was trained with (the run's config.yaml beside its logs)" + adapter_note
        + "; a different LoRA alpha would rescale the learned update and a different base model would "
        "apply it to other weights"
    )


def check_checkpoint_file(ckpt_path: str | Path | None) -> None:
    """Refuse a ``--ckpt_path`` that is not a checkpoint before torch reads it: a missing or empty file,
    a folder, or a file that is not a ``torch.save`` archive (a zip file)."""
    if ckpt_path is None or str(ckpt_path) in CKPT_PATH_SHORTCUTS:
        return
    path = Path(ckpt_path).expanduser()
    if "://" in str(ckpt_path):
        return  # a remote path: Lightning's fsspec reader opens it
    if path.is_dir():
        raise IsADirectoryError(f"--ckpt_path {ckpt_path} is a folder; give a .ckpt file in it (e.g. last.ckpt)")
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file; give a .ckpt file "
                                "written by cepo fit (under <log_dir>/checkpoints/)")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"--ckpt_path {ckpt_path} is empty (0 bytes): its write did not finish; give another "
                         "checkpoint of the run (a step*.ckpt beside it, or an earlier copy of last.ckpt)")
    if not zipfile.is_zipfile(path):
        with path.open("rb") as handle:
            head = handle.read(16)
        if head.startswith(b"PK"):
            raise ValueError(f"--ckpt_path {ckpt_path} is cut short ({size} bytes, no zip directory at its end): "
                             "its write did not finish; give another checkpoint of the run (a step*.ckpt "
                             "beside it, or an earlier copy of last.ckpt)")
        raise ValueError(f"--ckpt_path {ckpt_path} is not a checkpoint: a .ckpt file is a torch.save archive "
                         f"(a zip file), this one starts with {head!r}; give a .ckpt file written by cepo fit")


def check_shapes(state_dict: Mapping[str, torch.Tensor], parameters: Mapping[str, torch.Tensor]) -> None:
    """Refuse checkpoint tensors whose shape differs from this model's; a LoRA tensor's names the rank
    (``lora_A`` is ``(r, in)``, ``lora_B`` is ``(out, r)``). Checkpoints from before the policy record."""
    for name, tensor in state_dict.items():
        if name not in parameters or tuple(tensor.shape) == tuple(parameters[name].shape):
            continue
        theirs, ours = tuple(tensor.shape), tuple(parameters[name].shape)
        axis = 0 if "lora_A" in name else -1 if "lora_B" in name else None
        if axis is not None and theirs[axis] != ours[axis]:
            raise ValueError(
                f"model.policy.lora.r: the checkpoint's is {theirs[axis]}, this run's is {ours[axis]} (tensor "
                f"{name!r} is {theirs} in the checkpoint, {ours} here); load it with the LoRA rank it was "
                "trained with"
            )
        raise ValueError(
            f"checkpoint tensor {name!r} is {theirs}, this model's is {ours}: the checkpoint was written for "
            "another model; load it with the policy.name_or_path and LoRA settings it was trained with"
        )
