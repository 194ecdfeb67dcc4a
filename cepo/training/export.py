"""What a run leaves for use outside cepo: LoRA adapters beside the best checkpoints, and the adapter
merged into the base weights as a plain ``transformers`` model with its tokenizer and a model card.

* :class:`AdapterCheckpoint` (the CLI's ``checkpoint`` callback) writes ``<checkpoint>-adapter/`` next to
  every top-k checkpoint it keeps, and removes it with the checkpoint.
* :class:`MergedExport` (``--merge.at_fit_end true``) writes ``<log_dir>/merged/`` at the end of ``fit``.
* ``cepo export --config ... --ckpt_path CKPT`` (:meth:`CEPOTrainer.export`) does the same for any
  checkpoint or starting adapter.

The merged folder loads with ``AutoModelForCausalLM.from_pretrained(folder)`` and needs neither cepo nor
peft.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from peft.tuners.lora import LoraLayer
from torch import Tensor

from cepo.training.checkpoint_meta import check_checkpoint_file
from cepo.training.checkpointing import AtomicCheckpointIO, atomic_folder
from cepo.training.coherence_callback import CoherenceRewardCallback

TRAINED_ADAPTER = "default"


def merged_state_dict(policy, adapter: str = TRAINED_ADAPTER) -> dict[str, Tensor]:
    """The base model's state dict with ``adapter``'s LoRA update added to each adapted weight.

    Computed out of place, so the policy keeps training (or scoring) unchanged; keys are the plain
    ``transformers`` names (``...q_proj.weight``), with no LoRA entries.
    """
    base = policy.get_base_model()
    merged: dict[str, Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            weight = module.get_base_layer().weight
            merged[f"{name}.weight"] = (weight + module.get_delta_weight(adapter).to(weight.dtype)).detach()
    state = {}
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        state[plain] = merged.get(plain, value)
    return state


def save_merged(policy, tokenizer, output_dir: str | Path, card: str) -> Path:
    """Write the merged model, its tokenizer and ``README.md`` (the model card) to ``output_dir``, as one
    step (:func:`~cepo.training.checkpointing.atomic_folder`): a kill leaves the previous folder or the
    new one, never a mix."""
    target = Path(output_dir)
    base = policy.get_base_model()
    state = merged_state_dict(policy)
    use_cache = base.config.use_cache
    base.config.use_cache = True  # training may have turned it off for gradient checkpointing
    try:
        with atomic_folder(target) as staging:
            base.save_pretrained(str(staging), state_dict=state)
            tokenizer.save_pretrained(str(staging))
            (staging / "README.md").write_text(card)
    finally:
        base.config.use_cache = use_cache
    return target


# ---------------------------------------------------------------------------------------------------- card
def describe(obj: Any) -> str:
    """``ClassName(arg=value, ...)`` from an object's public, plain-valued attributes."""
    fields = {k: v for k, v in vars(obj).items()
              if not k.startswith("_") and k != "skipped" and isinstance(v, (str, int, float, bool))}
    name = getattr(obj, "name", None)
    if isinstance(name, str):
        fields.setdefault("name", name)
    return f"{type(obj).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"


def reward_summary(module: LightningModule, callbacks: list) -> list[str]:
    """One line per reward term with its weight (after ``model.reward_weights`` overrides), plus the fusion
    exponent."""
    overrides = getattr(module, "reward_weights", {})
    lines = [f"- {fn.name}: weight {overrides.get(fn.name, fn.weight):g} ({type(fn).__name__})"
             for fn in module.reward_functions]
    for callback in callbacks:
        if isinstance(callback, CoherenceRewardCallback):
            scorer = callback.scorer
            detail = (f"network {callback.network}, K = {scorer.num_counterfactuals} "
                      f"{type(scorer.counterfactual).__name__} counterfactuals"
                      + ("" if scorer.hardened else ", naive (unhardened)"))
            lines += [f"- coherence_{c}: weight {overrides.get(f'coherence_{c}', w):g} (CoherenceRewardCallback, {detail})"
                      for c, w in callback.weights.items()]
    lines.append(f"- fused by the weighted power mean with p = {module.reward_p:g}")
    return lines


def validation_rows(run_dir: Path, rollout_step: int | None = None) -> tuple[int | None, list[dict[str, Any]]]:
    """The rows of ``<run_dir>/val_results.jsonl`` from the latest validation at or before ``rollout_step``."""
    path = run_dir / "val_results.jsonl"
    if not path.is_file():
        return None, []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r["rollout_step"] for r in rows if rollout_step is None or r["rollout_step"] <= rollout_step]
    if not steps:
        return None, []
    step = max(steps)
    return step, [r for r in rows if r["rollout_step"] == step]


def model_card(module: LightningModule, datamodule, callbacks: list, run_dir: Path | None,
               rollout_step: int) -> str:
    """A short README: base model, data, reward, and the validation metrics of the exported weights."""
    config = module.policy_config
    lines = ["---", "library_name: transformers", f"tags: [cepo, {module.algorithm}, lora-merged]", "---", "",
             f"# {config.name_or_path} fine-tuned with cepo ({module.algorithm.upper()})", "",
             "LoRA adapter merged into the base weights; loads with "
             "`AutoModelForCausalLM.from_pretrained(<this folder>)`.", "",
             f"- base model: `{config.name_or_path}`" + (f" (started from adapter `{config.adapter_path}`)"
                                                       if config.adapter_path else ""),
             f"- algorithm: {module.algorithm}, trained for {rollout_step} rollout steps",
             f"- LoRA: r={config.lora.r}, alpha={config.lora.alpha:g}, target_modules={config.lora.target_modules}"]
    if datamodule is not None:
        lines.append(f"- training data: {describe(datamodule.train_source)}")
        for source in getattr(datamodule, "val_sources", []):
            lines.append(f"- validation data: {describe(source)}")
    lines += ["", "## Reward", "", *reward_summary(module, callbacks), "", "## Validation", ""]
    step, rows = validation_rows(run_dir, rollout_step) if run_dir is not None else (None, [])
    if not rows:
        lines.append("No validation results were recorded for these weights.")
    else:
        keys = [k for k in rows[0] if k not in ("stage", "dataset", "rollout_step")]
        lines += [f"At rollout step {step} (greedy unless the run set an evaluation temperature):", "",
                  "| dataset | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for row in rows:
            cells = [_cell(k, row.get(k, "")) for k in keys]
            lines.append(f"| {row['dataset']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(key: str, value: Any) -> str:
    if key in ("n", "skipped") and isinstance(value, (int, float)):
        return str(int(value))  # counts
    return f"{value:.3f}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------------- callbacks
class AdapterCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that also writes the LoRA adapter (PEFT format, with the tokenizer)
    beside each checkpoint it keeps, as ``<checkpoint name>-adapter/``, and deletes it with the checkpoint.
    The adapter of the best checkpoint is then usable without cepo (``PeftModel.from_pretrained``)."""

    @staticmethod
    def adapter_dir(filepath: str | Path) -> Path:
        path = Path(filepath)
        return path.with_name(f"{path.stem}-adapter")

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        trainer.lightning_module.export_adapter(str(self.adapter_dir(filepath)))

    def _remove_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        self._remove_adapter(filepath)

    @rank_zero_only
    def _remove_adapter(self, filepath: str) -> None:
        shutil.rmtree(self.adapter_dir(filepath), ignore_errors=True)


class MergedExport(Callback):
    """At the end of ``fit``, optionally write the merged model (see :func:`save_merged`)."""

    def __init__(self, at_fit_end: bool = False, output_dir: str | None = None) -> None:
        """
        Args:
            at_fit_end: At the end of ``fit``, merge the LoRA adapter into the base weights and save a plain
                ``transformers`` model with its tokenizer and a model card.
            output_dir: Where to write it (default ``<log_dir>/merged``).
        """
        self.at_fit_end, self.output_dir = at_fit_end, output_dir
        self.path: Path | None = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.at_fit_end:
            return
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # every rank: log_dir broadcasts
        self.path = Path(self.output_dir) if self.output_dir else run_dir / "merged"
        self._write(trainer, pl_module, run_dir)

    @rank_zero_only
    def _write(self, trainer: Trainer, pl_module: LightningModule, run_dir: Path) -> None:
        card = model_card(pl_module, trainer.datamodule, trainer.callbacks, run_dir, pl_module.rollout_step)
        save_merged(pl_module.policy, pl_module.tokenizer, self.path, card)
        rank_zero_info(f"merged model written to {self.path}")


class CEPOTrainer(Trainer):
    """Lightning's Trainer with one more entry point, ``export`` (the ``cepo export`` subcommand), and
    checkpoint files written atomically in their own folder (:class:`AtomicCheckpointIO`) unless a
    strategy or plugin brings its own writer."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if type(self.strategy.checkpoint_io) is TorchCheckpointIO:
            self.strategy.checkpoint_io = AtomicCheckpointIO()

    def export(self, model: LightningModule, datamodule=None, ckpt_path: str | None = None,
               output_dir: str | None = None) -> Path:
        """Merge a trained LoRA adapter into the base weights and save a plain transformers model.

        Args:
            model: The module, configured as in the run that wrote the checkpoint.
            datamodule: The run's data (named in the model card).
            ckpt_path: A checkpoint written by ``cepo fit``. Without it the starting adapter
                (``model.init_args.policy.adapter_path``) is merged.
            output_dir: Folder to write (default: the checkpoint's path with ``-merged`` instead of
                ``.ckpt``; required when merging a starting adapter).
        """
        if ckpt_path is None and not model.policy_config.adapter_path:
            raise ValueError(
                "cepo export needs trained weights: pass --ckpt_path <checkpoint from cepo fit> or set "
                "model.init_args.policy.adapter_path to a LoRA adapter folder"
            )
        if ckpt_path is None and output_dir is None:
            raise ValueError("cepo export of a starting adapter needs --output_dir <folder>")
        model.configure_model()
        run_dir, step = None, 0
        if ckpt_path is not None:
            path = Path(ckpt_path).expanduser()
            check_checkpoint_file(ckpt_path)
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
            model.on_load_checkpoint(checkpoint)
            model.load_state_dict(checkpoint["state_dict"])
            step = model.rollout_step
            run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
            output_dir = output_dir or str(path.with_name(f"{path.stem}-merged"))
        card = model_card(model, datamodule, self.callbacks, run_dir, step)
        target = save_merged(model.policy, model.tokenizer, output_dir, card)
        rank_zero_info(f"merged model written to {target}")
        return target
