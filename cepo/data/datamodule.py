"""The LightningDataModule: a resumable stream of prompt batches for training, lists for evaluation."""

from __future__ import annotations

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from cepo.records import Example
from cepo.data.sources import DatasetSource, ShortcutTask


class PromptBatch:
    """``examples`` for one step on this rank; ``index`` is the global batch number in the stream
    (-1 for evaluation batches), which is what a checkpoint records as the data position.

    A plain class, not a dataclass, on purpose: Lightning's precision plugins (``bf16-true``,
    ``16-true``) walk every dataclass in a batch to cast its tensors and refuse frozen ones such as
    :class:`Example`. A batch of text holds no tensors, so it must stay opaque to that walk.
    """

    __slots__ = ("examples", "index", "source")

    def __init__(self, examples: list[Example], index: int = -1, source: str = "") -> None:
        self.examples, self.index, self.source = examples, index, source

    def __len__(self) -> int:
        return len(self.examples)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PromptBatch):
            return NotImplemented
        return (self.examples, self.index, self.source) == (other.examples, other.index, other.source)

    def __repr__(self) -> str:
        return f"PromptBatch({len(self.examples)} examples, index={self.index}, source={self.source!r})"


def stream_positions(batch_index: int, batch_size: int, rank: int, world_size: int) -> range:
    """Positions in the infinite example stream that rank ``rank`` reads for global batch ``batch_index``."""
    start = batch_index * batch_size * world_size + rank * batch_size
    return range(start, start + batch_size)


class PromptStream(IterableDataset):
    """Endless, seeded, epoch-wise shuffled stream of prompt batches, starting at any batch index.

    Position p of the stream is example ``perm_e[p % N]`` of epoch ``e = p // N``, with ``perm_e`` drawn
    from ``seed + e``. Every rank computes the same permutation and reads its own slice of each global
    batch, so ranks never overlap and a run resumed at batch b reads exactly what it would have read.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1, source: str = "") -> None:
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.start_batch, self.rank, self.world_size, self.source = start_batch, rank, world_size, source
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {epoch: torch.randperm(len(self.examples), generator=generator).tolist()}
        return self._perms[epoch]

    def batch(self, index: int) -> PromptBatch:
        n = len(self.examples)
        rows = [self.examples[self._perm(p // n)[p % n]]
                for p in stream_positions(index, self.batch_size, self.rank, self.world_size)]
        return PromptBatch(rows, index, self.source)

    def __iter__(self):
        index = self.start_batch
        while True:
            yield self.batch(index)
            index += 1


def _collate_eval(source: str):
    def collate(rows: list[Example]) -> PromptBatch:
        return PromptBatch(list(rows), -1, source)

    return collate


def _identity(batch):
    return batch


class PromptDataModule(LightningDataModule):
    """Training prompts as an endless resumable stream; validation/test sets as one loader per source."""

    def __init__(
        self,
        train: DatasetSource | None = None,
        val: list[DatasetSource] | None = None,
        test: list[DatasetSource] | None = None,
        prompts_per_step: int = 8,
        eval_batch_size: int = 32,
        seed: int = 0,
        predict: list[DatasetSource] | None = None,
    ) -> None:
        """
        Args:
            train: Source of training prompts (default: the embedded shortcut task).
            val: Validation sources; each is evaluated and logged under its own name.
            test: Test sources for ``cepo test``.
            prompts_per_step: Prompts per rollout step on each device; every prompt gets ``group_size``
                samples, so a step generates ``prompts_per_step * group_size`` completions per device.
            eval_batch_size: Prompts per generation batch during validation/test.
            seed: Seed of the training stream's shuffling.
            predict: Sources whose questions ``cepo predict`` answers (default: the validation sources);
                ``cepo.PromptFile`` reads a JSONL/CSV/text file or stdin, with or without gold answers.
        """
        super().__init__()
        self.train_source = train if train is not None else ShortcutTask()
        self.val_sources = list(val or [])
        self.test_sources = list(test or [])
        self.predict_sources = list(predict or [])
        if prompts_per_step < 1 or eval_batch_size < 1:
            raise ValueError("data.prompts_per_step and data.eval_batch_size must be >= 1")
        self.prompts_per_step, self.eval_batch_size, self.seed = prompts_per_step, eval_batch_size, seed
        self.next_batch = 0
        self._cache: dict[int, list[Example]] = {}

    def _examples(self, source: DatasetSource) -> list[Example]:
        if id(source) not in self._cache:
            self._cache[id(source)] = source.load()
        return self._cache[id(source)]

    def eval_examples(self, stage: str) -> dict[str, list[Example]]:
        """``{source name: its examples}`` of the test sources (``stage="test"``) or the validation sources
        (any other stage), each loaded once."""
        sources = self.test_sources if stage == "test" else self.val_sources
        return {source.name: self._examples(source) for source in sources}

    def setup(self, stage: str) -> None:
        for source in self._sources(stage):
            self._examples(source)
        for split_names in (self.val_sources, self.test_sources, self.predict_sources):
            seen = [s.name for s in split_names]
            duplicates = sorted({n for n in seen if seen.count(n) > 1})
            if duplicates:
                raise ValueError(f"evaluation sources share the names {duplicates}; give each a distinct `name`")

    def _sources(self, stage: str) -> list[DatasetSource]:
        return {
            "fit": [self.train_source, *self.val_sources],
            "validate": self.val_sources,
            "test": self.test_sources,
            "predict": self.predict_sources or self.val_sources,
        }.get(stage, [])

    def train_dataloader(self) -> DataLoader:
        stream = PromptStream(
            self._examples(self.train_source), self.prompts_per_step, self.seed, start_batch=self.next_batch,
            rank=self.trainer.global_rank if self.trainer else 0,
            world_size=self.trainer.world_size if self.trainer else 1,
            source=self.train_source.name,
        )
        return DataLoader(stream, batch_size=None, collate_fn=_identity)

    def _eval_loaders(self, sources: list[DatasetSource]) -> list[DataLoader]:
        return [
            DataLoader(self._examples(s), batch_size=self.eval_batch_size, shuffle=False,
                       collate_fn=_collate_eval(s.name))
            for s in sources
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.val_sources)

    def test_dataloader(self) -> list[DataLoader]:
        if not self.test_sources:
            raise ValueError("`cepo test` needs data.test sources; add them to the config (see configs/)")
        return self._eval_loaders(self.test_sources)

    def predict_dataloader(self) -> list[DataLoader]:
        sources = self._sources("predict")
        if not sources:
            raise ValueError(
                "`cepo predict` needs questions: set data.predict (e.g. --data.predict+=cepo.PromptFile "
                "--data.predict.path questions.jsonl) or data.val sources"
            )
        return self._eval_loaders(sources)

    def eval_names(self, stage: str) -> list[str]:
        return [s.name for s in (self.test_sources if stage == "test" else self.val_sources)]

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Runs when a batch is about to be used (after Lightning's one-batch prefetch), so it marks the
        # true data position that a checkpoint taken after this step must resume from.
        if self.trainer is not None and self.trainer.training and isinstance(batch, PromptBatch) and batch.index >= 0:
            self.next_batch = batch.index + 1
        return batch

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return batch  # text only; the module tokenises on its own device

    def state_dict(self) -> dict:
        return {"next_batch": self.next_batch, "seed": self.seed, "prompts_per_step": self.prompts_per_step}

    def load_state_dict(self, state_dict: dict) -> None:
        resuming = self.trainer is None or self.trainer.state.fn == "fit"  # evaluation reads no stream
        if resuming and state_dict.get("prompts_per_step", self.prompts_per_step) != self.prompts_per_step:
            raise ValueError(
                f"the checkpoint was written with data.prompts_per_step={state_dict['prompts_per_step']}, "
                f"this run uses {self.prompts_per_step}; resume with the same value to continue the stream"
            )
        self.next_batch = int(state_dict["next_batch"])
