"""Model selection during training: evaluate on validation, track the best step, decide early stopping.

:class:`Validation` owns that state; its numbers live in the run state so a resumed run continues with the
same best metric and patience. Which way a metric improves comes from the task (``Task.metrics``).
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from distributed_ft.config.schema import JobConfig
from distributed_ft.engine.base import Engine
from distributed_ft.runtime.context import RuntimeContext
from distributed_ft.runtime.tracking import Progress
from distributed_ft.tasks.base import Task, metric_improved
from distributed_ft.train.checkpoint import RunState
from distributed_ft.train.evaluate import evaluate

log = logging.getLogger("distributed_ft")


class Validation:
    """Validation-set evaluation with best-checkpoint and early-stopping bookkeeping.

    Args:
        split: The prepared validation split (``None``: no validation; nothing is evaluated).
        state: The run state whose ``best_*``, ``evals_without_improvement`` and ``stopped_early`` this
            object updates (checkpointed with it).
    """

    def __init__(
        self,
        config: JobConfig,
        task: Task,
        split: pa.Table | None,
        labels: list[str],
        context: RuntimeContext,
        progress: Progress,
        state: RunState,
    ) -> None:
        self.config, self.task, self.split, self.labels = config, task, split, labels
        self.context, self.progress, self.state = context, progress, state
        self.metric = config.eval.metric
        self.evaluated: dict[int, dict[str, Any]] = {}
        """Validation metrics by step, for this process's evaluations."""

    @property
    def enabled(self) -> bool:
        return self.split is not None

    def due(self, step: int, epoch_ended: bool = False) -> bool:
        """Whether ``step`` is an evaluation step (``train.eval_every``, or an epoch end)."""
        if not self.enabled or step in self.evaluated:
            return False
        train = self.config.train
        if epoch_ended:
            return train.eval_each_epoch
        return bool(train.eval_every) and step % train.eval_every == 0

    def run(self, engine: Engine) -> tuple[dict[str, Any], bool]:
        """Evaluate now; returns the metrics and whether they are the best so far."""
        state = self.state
        metrics = evaluate(
            engine,
            self.task,
            self.split,
            self.labels,
            self.context,
            batch_size=self.config.eval.batch_size,
            progress=self.progress,
            desc="validation",
        )
        self.evaluated[state.step] = metrics
        value = metrics[self.metric]
        is_best = metric_improved(self.task, self.metric, value, state.best_metric)
        if is_best:
            state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
        else:
            state.evals_without_improvement += 1
        patience = self.config.train.early_stopping_patience
        state.stopped_early = patience is not None and state.evals_without_improvement >= patience
        log.info(
            "step %d validation %s=%.4f (best %.4f at step %s)",
            state.step,
            self.metric,
            value,
            state.best_metric,
            state.best_step,
        )
        return metrics, is_best
