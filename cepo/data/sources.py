"""Dataset sources selectable in the config (``class_path``/``init_args``).

Each source loads a list of :class:`~cepo.data.example.Example` and carries a ``name`` under which its
metrics are logged (``val/<name>/accuracy``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from lightning.pytorch.utilities import rank_zero_warn

from cepo.data.datasets import ADAPTERS, load_examples, paper_training_mix
from cepo.records import Example
from cepo.data.shortcut import shortcut_examples


class DatasetSource:
    """Base class: ``load()`` returns the examples; ``skipped`` counts malformed rows that were dropped."""

    def __init__(self, name: str | None = None, limit: int | None = None) -> None:
        self._name = name
        self.limit = limit
        self.skipped = 0

    @property
    def name(self) -> str:
        return self._name or self.default_name()

    def default_name(self) -> str:
        return type(self).__name__.lower()

    def load(self) -> list[Example]:
        examples = self._load()
        if self.limit is not None:
            examples = examples[: self.limit]
        if not examples:
            raise ValueError(f"dataset source {self.name!r} produced no examples; check its path and options")
        return examples

    def _load(self) -> list[Example]:
        raise NotImplementedError


def report_skips(source: DatasetSource, skips: list[tuple[str, str]], examples: list, check: str = "") -> None:
    """Count ``source``'s skipped rows, name the first three in a warning, and refuse a source whose
    every row was skipped."""
    source.skipped = len(skips)
    path = getattr(source, "path", source.name)
    if skips:
        first = "; ".join(f"{where}: {why}" for where, why in skips[:3])
        more = f"; and {len(skips) - 3} more" if len(skips) > 3 else ""
        rank_zero_warn(f"{source.name}: skipped {len(skips)} malformed rows of {path} (on_error=skip): {first}{more}")
    if not examples and skips:
        raise ValueError(
            f"dataset source {source.name!r}: every row of {path} was skipped ({len(skips)}); the first: "
            f"{skips[0][0]}: {skips[0][1]}. Check {check}the question_field/answer_field options"
        )


class ShortcutTask(DatasetSource):
    """The embedded arithmetic task with a planted cue (see ``cepo.data.shortcut``)."""

    def __init__(
        self,
        split: Literal["train", "in_distribution", "flipped", "edited"] = "train",
        size: int = 2000,
        seed: int = 0,
        cue_rate: float = 0.9,
        n_steps: int | None = None,
        max_operand: int | None = None,
        name: str | None = None,
        variant: Literal["easy", "hard"] = "easy",
        min_operand: int | None = None,
    ) -> None:
        """
        Args:
            split: ``train``, ``in_distribution``, ``flipped`` (cue never equals the answer) or ``edited``
                (one premise number changed, cue keeps the old answer).
            size: Number of items to generate.
            seed: Generator seed; each split draws from its own stream.
            cue_rate: Fraction of ``train``/``in_distribution`` items whose cue equals the answer.
            n_steps: Arithmetic operations per question (default: the variant's, 2).
            max_operand: Largest operand (default: the variant's, 9 or 99).
            name: Name in logs (default: the split).
            variant: ``easy`` (one-digit operands; policy ``embedded:tiny-shortcut-llama``) or ``hard``
                (two-digit operands with carries; policy ``embedded:tiny-shortcut-hard-llama``).
            min_operand: Smallest operand (default: the variant's, 1 or 10).
        """
        super().__init__(name=name)
        self.split, self.size, self.seed = split, size, seed
        self.cue_rate, self.n_steps, self.max_operand = cue_rate, n_steps, max_operand
        self.variant, self.min_operand = variant, min_operand

    def default_name(self) -> str:
        return self.split

    def _load(self) -> list[Example]:
        return shortcut_examples(
            self.split, self.size, self.seed, cue_rate=self.cue_rate, variant=self.variant, n_steps=self.n_steps,
            max_operand=self.max_operand, min_operand=self.min_operand,
        )


class FileDataset(DatasetSource):
    """A local data file or folder, or a hub dataset, read through a named adapter."""

    def __init__(
        self,
        path: str,
        adapter: str = "generic",
        split: str | None = None,
        question_field: str = "question",
        answer_field: str = "answer",
        on_error: Literal["raise", "skip"] = "raise",
        limit: int | None = None,
        name: str | None = None,
        config_name: str | None = None,
    ) -> None:
        """
        Args:
            path: Local ``.json``/``.jsonl``/``.csv``/``.parquet`` file; a folder holding ``<split>.jsonl``
                (or ``.json``/``.csv``), written by ``datasets``' ``save_to_disk``, or of hub-layout Parquet
                shards; or a hub dataset name. Parquet, ``datasets`` folders and hub names need
                ``cepo[hub]``; offline, a hub name needs ``HF_HUB_OFFLINE=1`` and a cached copy.
            adapter: Format adapter, one of: @ADAPTERS@.
            split: Split of a folder, a saved ``DatasetDict`` or a hub dataset (``train``, ``test``, ...);
                optional when there is only one.
            question_field: Question column (by default ``question``, else ``problem`` or ``input``).
            answer_field: Answer column (by default ``answer``, else ``target``).
            on_error: ``raise`` on an unreadable or malformed row (the error names file and line) or
                ``skip`` it and count it (a warning at load naming the first rows and why, and
                ``skipped`` in the dataset's evaluation results).
            limit: Keep only the first ``limit`` examples (file order, so CLadder's adjacent pairs stay
                together).
            name: Name in logs (default: the file stem or dataset name).
            config_name: Configuration of a hub dataset (GSM8K on the hub needs ``main``).
        """
        super().__init__(name=name, limit=limit)
        if adapter not in ADAPTERS:
            raise ValueError(
                f"FileDataset.adapter: unknown dataset adapter {adapter!r}; choose one of {', '.join(ADAPTERS)}"
            )
        self.path, self.adapter, self.split = path, adapter, split
        self.question_field, self.answer_field, self.on_error = question_field, answer_field, on_error
        self.config_name = config_name

    def default_name(self) -> str:
        return Path(self.path).stem if Path(self.path).suffix else self.path.rstrip("/").split("/")[-1]

    def _load(self) -> list[Example]:
        loaded = load_examples(
            self.path, self.adapter, split=self.split, question_field=self.question_field,
            answer_field=self.answer_field, on_error=self.on_error, config_name=self.config_name,
        )
        report_skips(self, loaded.skips, loaded.examples, f"the adapter ({self.adapter!r}) and ")
        return list(loaded.examples)


# The adapter list in --help is the registry's, so a newly registered adapter shows up there too.
FileDataset.__init__.__doc__ = FileDataset.__init__.__doc__.replace(
    "@ADAPTERS@", ", ".join(f"``{name}``" for name in ADAPTERS)
)


class PaperMix(DatasetSource):
    """The CE-PO authors' training mixture: four sources, ``per_source`` items each, 80/20 split per source."""

    def __init__(
        self,
        root: str,
        part: Literal["train", "val"] = "train",
        per_source: int = 200,
        val_fraction: float = 0.2,
        seed: int = 42,
        name: str | None = None,
    ) -> None:
        """
        Args:
            root: Folder holding the four training files (``bbeh_causal_understanding.json``, ...).
            part: ``train`` or ``val`` side of the per-source split.
            per_source: Items drawn from each source.
            val_fraction: Fraction of each source held out for validation.
            seed: Seed of the per-source split (the authors used 42).
            name: Name in logs (default ``paper_mix_<part>``).
        """
        super().__init__(name=name)
        if part not in ("train", "val"):
            raise ValueError(f"PaperMix.part must be 'train' or 'val', got {part!r}")
        self.root, self.part, self.per_source, self.val_fraction, self.seed = root, part, per_source, val_fraction, seed

    def default_name(self) -> str:
        return f"paper_mix_{self.part}"

    def _load(self) -> list[Example]:
        train, val = paper_training_mix(self.root, self.per_source, self.val_fraction, self.seed)
        return train if self.part == "train" else val
