"""What a run writes about itself: per-rollout statistics, histograms and completion tables to each logger (through :mod:`cepo.training.loggers`),
and each evaluation's metrics to the logger, the console and ``<log_dir>/<stage>_results.jsonl``.

:class:`RunLogging` is a mixin of :class:`~cepo.training.module.CEPOModule`; it reads the module's rollout
step, KL controller, optimiser-step count and evaluation metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from cepo.evaluation.metrics import EvalMetrics, format_table, rollout_faithfulness
from cepo.records import Rollout
from cepo.rl.advantages import zero_std_fraction
from cepo.rl.reductions import masked_mean
from cepo.training import loggers


class RunLogging:
    """Logging of rollouts and evaluation results (a mixin of the LightningModule)."""

    # ------------------------------------------------------------------ rollout statistics
    def log_rollout(self, rollout: Rollout, stats: dict[str, float], advantages: torch.Tensor | None = None) -> None:
        mask = rollout.completion_mask.float()
        lengths = mask.sum(-1)
        metrics: dict[str, float] = {}
        for name, values in rollout.rewards.items():
            key = "reward" if name == "reward" else f"rewards/{name}"
            metrics[f"{key}_mean"] = float(values.mean())
            metrics[f"{key}_std"] = float(values.std()) if len(values) > 1 else 0.0
        metrics["zero_std_groups"] = float(zero_std_fraction(rollout.rewards["reward"], rollout.group_size))
        metrics["completion/length_mean"] = float(lengths.mean())
        metrics["completion/length_max"] = float(lengths.max())
        metrics["completion/truncated"] = float(rollout.truncated.float().mean())
        if rollout.prompt_truncated is not None:
            metrics["prompt/truncated"] = float(rollout.prompt_truncated.float().mean())
        metrics["completion/marker_found"] = float(rollout.marker_found.float().mean())
        metrics["lr"] = float(self.lr_schedulers().get_last_lr()[0])
        metrics["optimizer_steps"] = float(self._optimizer_steps)
        metrics["kl_coef"] = float(self.kl_controller.value)
        metrics.update({k: float(v) for k, v in rollout.stats.items()})
        metrics.update({k: float(v) for k, v in stats.items()})
        # the training rollouts' own accuracy, faithful, unfaithful-right and cue-copy rates
        metrics.update({f"rollouts/{k}": v for k, v in rollout_faithfulness(rollout).items()})
        values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            values = self.trainer.strategy.reduce(values, reduce_op="mean")
        logged = dict(zip(metrics, values.tolist()))
        self.log_dict({f"train/{k}": v for k, v in logged.items()}, on_step=True, on_epoch=False, sync_dist=False)
        self.log("rollout_step", float(self.rollout_step), on_step=True, on_epoch=False)
        # The progress bar: reward, accuracy (when an accuracy term exists) and seconds per rollout step.
        self.log("reward", logged["reward_mean"], prog_bar=True, logger=False, on_step=True, on_epoch=False)
        if "rewards/accuracy_mean" in logged:
            self.log("acc", logged["rewards/accuracy_mean"], prog_bar=True, logger=False, on_step=True, on_epoch=False)
        if "time/step_s" in logged:
            self.log("s/step", logged["time/step_s"], prog_bar=True, logger=False, on_step=True, on_epoch=False)
        self.log("train/reward", logged["reward_mean"], on_step=True, on_epoch=False)
        stalled = self.constant_reward.update(logged["reward_mean"], logged["reward_std"])
        self.log("train/reward_constant_steps", float(self.constant_reward.run), on_step=True, on_epoch=False)
        if stalled:
            rank_zero_warn(stalled)
        row_advantages = self._row_advantages(advantages, mask) if advantages is not None else None
        self._log_rollout_tables(rollout, row_advantages)

    @staticmethod
    def _row_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One advantage per row: the sequence's own, or the mean over its completion tokens (N,)."""
        if advantages.dim() == 1:
            return advantages.detach().float().cpu()
        return masked_mean(advantages.detach().float(), mask, dim=-1).cpu()

    @rank_zero_only
    def _log_rollout_tables(self, rollout: Rollout, advantages: torch.Tensor | None) -> None:
        """Every ``log_every_n_steps`` rollouts: histograms of each reward term and of the advantages, and
        the first ``completions_to_log`` completions as a table with every term and the advantage, on each
        logger that can show them (:mod:`cepo.training.loggers`)."""
        every = max(1, self.trainer.log_every_n_steps)
        if self.rollout_step % every or not self.loggers:
            return
        histograms = {f"train/{'reward' if name == 'reward' else 'rewards/' + name}": values
                      for name, values in rollout.rewards.items()}
        if advantages is not None:
            histograms["train/advantage"] = advantages
        loggers.log_histograms(self.loggers, histograms, self.rollout_step)
        if not self.completions_to_log:
            return
        names = list(rollout.rewards)
        table = loggers.CompletionsTable(
            step=self.rollout_step, text_columns=["prompt", "completion", "answer", "gold"],
            number_columns=names + (["advantage"] if advantages is not None else []), rows=[])
        for i in range(min(self.completions_to_log, len(rollout))):
            texts = [rollout.prompts[i], rollout.completions[i], rollout.answers[i], " / ".join(rollout.examples[i].gold)]
            numbers = [float(rollout.rewards[n][i]) for n in names]
            if advantages is not None:
                numbers.append(float(advantages[i]))
            table.rows.append((texts, numbers))
        loggers.log_completions(self.loggers, table)

    # ------------------------------------------------------------------ evaluation results
    def _eval_start(self, stage: str) -> None:
        names = self.trainer.datamodule.eval_names(stage) if hasattr(self.trainer.datamodule, "eval_names") else []
        self._eval_metrics = {name: EvalMetrics().to(self.device) for name in names}

    def on_validation_epoch_start(self) -> None:
        self._eval_start("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start("test")

    def _eval_end(self, stage: str) -> dict[str, dict[str, float]]:
        results = {name: metric.compute() for name, metric in self._eval_metrics.items()}
        datamodule = getattr(self.trainer, "datamodule", None)
        sources = getattr(datamodule, "test_sources" if stage == "test" else "val_sources", [])
        for source in sources:  # malformed rows skipped at load (on_error: skip), so no one misses them
            if source.name in results and source.skipped:
                results[source.name]["skipped"] = float(source.skipped)
        flat = {}
        for name, values in results.items():
            for key, value in values.items():
                flat[f"{stage}/{name}/{key}"] = value
        if results:
            accuracies = [v["accuracy"] for v in results.values() if "accuracy" in v]
            flat[f"{stage}/accuracy"] = sum(accuracies) / len(accuracies)
        if self.trainer.sanity_checking:
            # `trainer.num_sanity_val_steps: -1` runs every validation batch before the first rollout:
            # that pass is the step-0 validation (what training starts from). Lightning drops what is
            # self.log-ged while sanity checking, so it goes to the loggers directly. A partial check, or
            # the one a resumed run makes, is only a check.
            if self.trainer.num_sanity_val_steps != float("inf") or self.rollout_step != 0:
                return results
            if self.trainer.is_global_zero:
                for logger in self.loggers:
                    logger.log_metrics({key: float(value) for key, value in flat.items()}, step=0)
        else:
            for key, value in flat.items():
                self.log(key, value, sync_dist=False, add_dataloader_idx=False)
        self._report(stage, results, self.run_dir())
        if stage == "val":
            self.last_val_metrics = {key: float(value) for key, value in flat.items()}
        return results

    def run_dir(self) -> Path:
        """The run's log folder (:func:`cepo.training.loggers.run_dir`). Call on every rank: the path is
        broadcast, so reading it inside rank-zero-only code would leave the other ranks out of a collective
        and hang DDP."""
        return loggers.run_dir(self.trainer)

    @rank_zero_only
    def _report(self, stage: str, results: dict[str, dict[str, float]], run_dir: Path) -> None:
        rank_zero_info(format_table(stage, results, step=self.rollout_step))
        path = run_dir / f"{stage}_results.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            for name, values in results.items():
                handle.write(json.dumps({"stage": stage, "dataset": name, "rollout_step": self.rollout_step, **values}) + "\n")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")
