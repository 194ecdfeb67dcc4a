"""``cepo predict``: answer questions with a trained policy and write one JSON line per completion.

The module's ``predict_step`` generates exactly as validation does (greedy unless
``model.generation.eval_temperature`` > 0; ``model.eval_num_samples`` completions per question) and
returns the rollout; :class:`PredictionWriter` turns each rollout into records and appends them to a
JSONL file as the batches finish.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from cepo.answers.matching import answers_match
from cepo.coherence.scorer import CHANNELS
from cepo.records import Rollout
from cepo.rewards.network import score_coherence
from cepo.training.coherence_callback import CoherenceRewardCallback
from cepo.training.loggers import run_dir

STDOUT = "-"


def prediction_records(rollout: Rollout, dataset: str, coherence: dict[str, torch.Tensor] | None = None
                       ) -> list[dict[str, Any]]:
    """One JSON-ready record per completion of ``rollout``, whose questions come from the source named
    ``dataset``.

    ``correct`` is present only when the question has a gold answer; it is the accuracy reward's verdict
    (``answers_match`` under the example's matching rule). ``coherence`` maps channel names to ``(N,)``
    scores to include as ``coherence_<channel>``, and may hold ``truncated``: 1 where the scored sequence was
    cut to fit the model's positions (written as the boolean ``coherence_truncated``).
    """
    records = []
    group = max(rollout.group_size, 1)
    for i, example in enumerate(rollout.examples):
        record: dict[str, Any] = {
            "dataset": dataset,
            "id": example.id,
            "sample": i % group,
            "question": example.question,
            "prompt": rollout.prompts[i],
            "completion": rollout.completions[i],
            "rationale": rollout.rationales[i],
            "answer": rollout.answers[i],
            "marker_found": bool(rollout.marker_found[i]),
            "truncated": bool(rollout.truncated[i]),
            "prompt_truncated": rollout.prompt_truncated is not None and bool(rollout.prompt_truncated[i]),
        }
        if example.gold:
            record["gold"] = list(example.gold)
            record["correct"] = bool(answers_match(
                rollout.answers[i], example.gold, example.answer_kind, options=example.meta.get("options")
            ))
        for channel, values in (coherence or {}).items():
            value = float(values[i])
            record[f"coherence_{channel}"] = bool(value) if channel in _FLAGS else value
        records.append(record)
    return records


# the scorer's per-row flags that go into each prediction record, as true/false
_FLAGS = ("truncated", "capped")


class PredictionBatch:
    """What ``predict_step`` returns: the rollout of one batch and, when requested, its coherence scores.

    A plain class rather than a dataclass, so Lightning's output handling leaves it whole;
    ``trainer.predict(...)`` returns a list of these (``records()`` gives the JSON lines).
    """

    def __init__(self, rollout: Rollout, dataset: str) -> None:
        self.rollout, self.dataset = rollout, dataset
        self.coherence: dict[str, torch.Tensor] | None = None

    def records(self) -> list[dict[str, Any]]:
        return prediction_records(self.rollout, self.dataset, self.coherence)


class PredictionWriter(Callback):
    """Writes ``cepo predict``'s completions as JSON lines (nothing happens in fit/validate/test).

    Each line holds ``dataset``, ``id``, ``sample``, ``question``, ``prompt`` (Z as the policy saw it: a
    prompt cut to fit is written as cut), ``completion``, ``rationale`` (X) and ``answer`` (Y) from the
    project's answer parser, ``marker_found``, ``truncated`` (the completion hit its budget),
    ``prompt_truncated`` (the prompt was cut from the left), and, when the question has a gold answer,
    ``gold`` and ``correct``; with ``coherence``, the channel scores and ``coherence_truncated``.
    """

    def __init__(self, output: str | None = None, coherence: bool = False) -> None:
        """
        Args:
            output: JSONL file to write (overwritten); ``-`` writes to stdout (add
                ``--trainer.enable_progress_bar false`` to keep the progress bar out of it). Default:
                ``<log_dir>/predictions.jsonl``. With several devices each rank writes its own file,
                suffixed ``.rank<N>``.
            coherence: Also score each completion's coherence channels (``coherence_zx``,
                ``coherence_xy``, ``coherence_zy``) with the configured ``CoherenceRewardCallback``'s
                scorer and network (default scorer on the reference network if none is configured).
                Costs one Jacobian pass per batch.
        """
        self.output = output
        self.coherence = coherence
        self.path: Path | None = None
        self.written = 0
        self._handle: TextIO | None = None
        self._scoring: CoherenceRewardCallback | None = None

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.written = 0
        log_dir = run_dir(trainer)  # every rank: the path is broadcast
        if self.output == STDOUT:
            self.path, self._handle = None, sys.stdout
        else:
            path = Path(self.output).expanduser() if self.output else log_dir / "predictions.jsonl"
            if trainer.world_size > 1:
                path = path.with_name(f"{path.name}.rank{trainer.global_rank}")
            path.parent.mkdir(parents=True, exist_ok=True)
            self.path, self._handle = path, path.open("w")
        self._scoring = None
        if self.coherence:
            configured = [cb for cb in trainer.callbacks if isinstance(cb, CoherenceRewardCallback)]
            self._scoring = configured[0] if configured else CoherenceRewardCallback()

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(outputs, PredictionBatch):
            raise TypeError(
                f"PredictionWriter expects predict_step to return a PredictionBatch, got {type(outputs).__name__}"
            )
        if self._scoring is not None:
            outputs.coherence = self._score(pl_module, outputs.rollout)
        for record in outputs.records():
            self._handle.write(json.dumps(record) + "\n")
            self.written += 1
        self._handle.flush()

    def _score(self, pl_module: LightningModule, rollout: Rollout) -> dict[str, torch.Tensor]:
        callback = self._scoring
        result = score_coherence(pl_module, callback.network, callback.scorer, rollout.examples, rollout.prompts,
                                 rollout.rationales, rollout.answers, pl_module.rollout_step)
        scores = {channel: getattr(result, channel) for channel in CHANNELS}
        for flag in _FLAGS:
            scores[flag] = result.diagnostics.get(flag, torch.zeros(len(rollout)))
        return scores

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._handle is not None and self._handle is not sys.stdout:
            self._handle.close()
            rank_zero_info(f"{self.written} predictions written to {self.path}")
        self._handle = None
