"""Loading a Hugging Face causal LM and its tokenizer, and wrapping it with LoRA."""

from __future__ import annotations

from typing import Literal, Mapping

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

EMBEDDED_PREFIX = "embedded:"
CONFIG_PREFIX = "config:"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
REFERENCE_ADAPTER = "reference"
_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (Hu et al. 2021), passed to ``peft.LoraConfig``."""

    r: int = 16
    """Rank of the low-rank update."""
    alpha: float = 32.0
    """Scaling numerator: the update is multiplied by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the LoRA input. Non-zero dropout makes the first policy ratio of a step differ from 1."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or ``"all-linear"`` for every linear layer except the LM head."""


@dataclass
class PolicyConfig:
    """Which network to fine-tune and how to load it."""

    name_or_path: str = "embedded:tiny-shortcut-llama"
    """A hub id (``Qwen/Qwen2.5-0.5B-Instruct``), a local folder, ``embedded:NAME`` for a model
    shipped inside the package (``embedded:tiny-shortcut-llama``), or ``config:FOLDER`` for a model
    built with random weights from ``FOLDER/config.json`` and the tokenizer in the same folder (memory
    and speed measurements at a real model's shape, nothing downloaded)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when ``name_or_path`` is a hub id."""
    adapter_path: str | None = None
    """Start from an existing LoRA adapter (a PEFT folder). Its frozen copy becomes the reference model."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings for a new adapter (ignored when ``adapter_path`` is set)."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Storage dtype of the base weights: ``float32``, ``bfloat16``, ``float16`` or ``auto``. Keep float32
    with ``*-mixed`` precision; use bfloat16 with ``bf16-true``."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant, works with frozen PEFT bases)."""
    attn_implementation: str | None = None
    """``eager``, ``sdpa`` or ``flash_attention_2``; None lets transformers choose."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository (only for models you trust)."""
    disable_dropout: bool = True
    """Turn off the base model's own dropout (GPT-2: 0.1). With it on, policy and reference log-probs of
    identical weights differ, the first policy ratio is not 1 and the KL is not 0 at step 0. LoRA
    dropout (``lora.dropout``) is not affected."""


def resolve_model_path(name_or_path: str) -> str:
    """Map ``embedded:NAME`` to the packaged folder and ``config:FOLDER`` to ``FOLDER``; leave hub ids and
    paths unchanged."""
    if name_or_path.startswith(CONFIG_PREFIX):
        folder = Path(name_or_path[len(CONFIG_PREFIX) :]).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"policy.name_or_path={name_or_path!r}: {folder / 'config.json'} does not exist. config:FOLDER "
                "needs a folder with a model's config.json and its tokenizer files; write one for a Qwen2.5 "
                "shape with `python benchmarks/gpu_step.py --write-model FOLDER`."
            )
        return str(folder)
    if not name_or_path.startswith(EMBEDDED_PREFIX):
        return name_or_path
    name = name_or_path[len(EMBEDDED_PREFIX) :]
    path = ASSETS_DIR / name
    if not (path / "config.json").is_file():
        available = sorted(p.name for p in ASSETS_DIR.iterdir() if (p / "config.json").is_file())
        raise FileNotFoundError(
            f"embedded model {name!r} not found in {ASSETS_DIR} (available: {available}). "
            "Rebuild the default one with `python -m cepo.assets.build_tiny_model`."
        )
    return str(path)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def load_tokenizer(config: PolicyConfig):
    path = resolve_model_path(config.name_or_path)
    # A config: folder's tokenizer.json is used as written: AutoTokenizer would rebuild the tokenizer of
    # the config's model type (Qwen2's byte-level BPE) around its vocabulary.
    kind = PreTrainedTokenizerFast if config.name_or_path.startswith(CONFIG_PREFIX) else AutoTokenizer
    tokenizer = _from_pretrained(kind, path, config, "tokenizer")
    if tokenizer.pad_token_id is None:
        # Padding is always masked out; reusing EOS is the usual choice for decoder-only models.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {config.name_or_path!r} has no EOS token; generation needs one to stop")
    return tokenizer


def _from_pretrained(cls, path: str, config: PolicyConfig, what: str, **kwargs):
    if _looks_like_path(path) and not Path(path).expanduser().exists():
        raise FileNotFoundError(
            f"policy.name_or_path={config.name_or_path!r}: no such folder. Give an existing local folder "
            "or a hub id such as Qwen/Qwen2.5-0.5B-Instruct."
        )
    try:
        return cls.from_pretrained(
            path, revision=config.revision, trust_remote_code=config.trust_remote_code, **kwargs
        )
    except OSError as err:
        raise OSError(
            f"could not load the {what} of policy.name_or_path={config.name_or_path!r}: {err}. "
            "Check the hub id or folder; offline machines need a local folder (or HF_HUB_OFFLINE=1 with "
            "a filled cache)."
        ) from err


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability of ``model`` to 0 and return how many were non-zero.

    Covers ``nn.Dropout`` modules, the float ``*dropout*`` attributes that attention implementations
    pass to functional dropout (``self.attention_dropout``), and the config fields they are read from.
    Done once at load time rather than by switching to eval mode around each pass: Hugging Face models
    run gradient checkpointing only in train mode, and a checkpointed layer recomputes its forward in
    the backward pass, which must see the same (dropout-free) network as the forward did.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            changed += module.p > 0
            module.p = 0.0
            continue
        for attr, value in list(vars(module).items()):
            if "dropout" in attr and isinstance(value, float) and not isinstance(value, bool) and value > 0:
                setattr(module, attr, 0.0)
                changed += 1
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in config.to_dict().items():
            if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float) and value > 0:
                setattr(config, key, 0.0)
    return changed


def same_model(a: str | None, b: str | None) -> bool:
    """Whether two ``policy.name_or_path`` values name the same model: equal, or the same last name
    component (a hub id and a local copy of it, ``embedded:NAME`` and its packaged folder)."""
    if a == b:
        return True
    if not a or not b:
        return False
    last = [re.split(r"[/\\:]", name.rstrip("/\\"))[-1] for name in (a, b)]
    return last[0] == last[1] and bool(last[0])


def check_finite(tensors: Mapping[str, torch.Tensor], what: str, fix: str) -> None:
    """Refuse ``tensors`` (a state dict) when one holds a NaN or an infinity, naming it and the count."""
    for name, tensor in tensors.items():
        if not torch.is_tensor(tensor) or not tensor.is_floating_point():
            continue
        bad = ~torch.isfinite(tensor)
        count = int(bad.sum())
        if count:
            kinds = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
            if kinds == "NaN" and bool(torch.isinf(tensor).any()):
                kinds = "NaN and infinite"
            raise ValueError(
                f"{what}: tensor {name!r} holds {count} {kinds} value(s) of {tensor.numel()}; {fix}"
            )


def check_adapter(policy, config: PolicyConfig) -> None:
    """Refuse a starting adapter (``policy.adapter_path``) trained on another base model, or holding a
    weight that is not finite (it would sample NaN probabilities, or evaluate as all wrong)."""
    trained = getattr(policy.peft_config.get("default"), "base_model_name_or_path", None)
    if trained and not same_model(trained, resolve_model_path(config.name_or_path)) and not same_model(
            trained, config.name_or_path):
        raise ValueError(
            f"policy.adapter_path={config.adapter_path!r} was trained on base model {trained!r}, but "
            f"policy.name_or_path is {config.name_or_path!r}; set policy.name_or_path to the adapter's base "
            "model (its adapter_config.json, base_model_name_or_path)"
        )
    weights = {name: param for name, param in policy.named_parameters() if "lora_" in name}
    check_finite(weights, f"policy.adapter_path={config.adapter_path!r}",
                 "the run that wrote this adapter diverged; start from an earlier adapter or without one")


def load_policy(config: PolicyConfig) -> tuple[PeftModel, bool]:
    """The LoRA-wrapped policy and whether it carries a frozen ``reference`` adapter.

    Only LoRA weights are trainable. With ``adapter_path`` the adapter is loaded twice: once trainable
    (``default``) and once frozen (``reference``), because disabling a starting adapter would give the
    base model, which is the wrong reference for a run that starts from fine-tuned weights.
    """
    if config.dtype not in _DTYPES:
        raise ValueError(f"policy.dtype={config.dtype!r}; choose one of {sorted(_DTYPES)}")
    path = resolve_model_path(config.name_or_path)
    kwargs = {"dtype": _DTYPES[config.dtype]}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    if config.name_or_path.startswith(CONFIG_PREFIX):
        # Random weights from torch's generator (seed_everything makes them reproducible); no weight
        # files, so dtype "auto" has no stored dtype to follow and gives torch's default, float32.
        if kwargs["dtype"] == "auto":
            del kwargs["dtype"]
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), **kwargs)
    else:
        base = _from_pretrained(AutoModelForCausalLM, path, config, "model", **kwargs)
    if config.disable_dropout:
        disable_dropout(base)  # before LoRA is injected, so lora.dropout keeps its configured value
    if config.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False  # training forward passes; generation turns the cache back on
    if config.adapter_path:
        adapter = Path(config.adapter_path).expanduser()
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"policy.adapter_path={config.adapter_path!r} holds no adapter_config.json; point it at a "
                "folder written by PeftModel.save_pretrained (cepo writes one under <log_dir>/adapter)."
            )
        policy = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
        policy.load_adapter(str(adapter), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        policy.set_adapter("default")
        check_adapter(policy, config)
        has_reference = True
    else:
        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        try:
            policy = get_peft_model(base, lora)
        except ValueError as err:
            if "not found in the base model" not in str(err):
                raise
            linear = sorted({name.rsplit(".", 1)[-1] for name, module in base.named_modules()
                             if isinstance(module, nn.Linear) and name != "lm_head"})
            raise ValueError(
                f"policy.lora.target_modules={config.lora.target_modules!r} matches no layer of "
                f"{config.name_or_path!r}; its linear layers are {linear}: name some of them, or use all-linear"
            ) from err
        has_reference = False
    for name, param in policy.named_parameters():
        param.requires_grad_(".default." in name and "lora_" in name)
    return policy, has_reference
