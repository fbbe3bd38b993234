"""The Task seam: what the loop, evaluation and prediction need to know about a task."""

from __future__ import annotations

from typing import Any, Protocol

import pyarrow as pa
import torch
from torch import nn

from distributed_ft.data.prepare import PreparedDataset
from distributed_ft.data.sources import Batch


class Task(Protocol):
    """A task: its data encoding, model head, loss, predictions and metrics."""

    name: str
    default_metric: str
    metrics: dict[str, str]
    """Metric name -> ``"max"`` or ``"min"``: what ``eval.metric`` may be and which way is better."""

    def prepare_data(
        self, tokenizer: Any, splits: dict[str, str], labels: list[str] | None
    ) -> PreparedDataset:
        """Read, validate, encode and cache ``{split: path}``; ``labels`` fixed when given."""
        ...

    def restore_assets(self, meta: dict[str, Any]) -> None:
        """Take back what ``prepare_data`` learned and kept in the manifest (``PreparedDataset.meta``).

        Every consumer of prepared data calls it (Ray workers and later readers never run
        ``prepare_data``), so the task behaves the same wherever the data was prepared.
        """
        ...

    def build_model(self, labels: list[str] | None) -> nn.Module: ...

    def collate(self, rows: list[dict[str, Any]], with_meta: bool = False) -> Batch:
        """Pad rows into model inputs; ``with_meta`` adds ``batch["meta"]`` for evaluation."""
        ...

    def loss_weight(self, batch: Batch) -> torch.Tensor:
        """The batch's share of the loss denominator (targets, or their class weights), from labels only."""
        ...

    def loss_sum(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """The summed loss of the batch; ``loss_sum / loss_weight`` is its mean loss."""
        ...

    def predictions(self, outputs: Any, batch: Batch) -> list[tuple[int, Any]]:
        """``(example_id, prediction)`` for every example of an evaluation batch."""
        ...

    def score(self, predictions: dict[int, Any], split: pa.Table, labels: list[str]) -> dict[str, Any]:
        """Metrics of ``predictions`` against the gold labels kept in the prepared ``split``."""
        ...

    def format_report(self, metrics: dict[str, Any]) -> str: ...


def metric_improved(task: Task, metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of ``metric`` beats ``best``, in the direction the task declares for it."""
    if best is None:
        return True
    return value < best if task.metrics.get(metric, "max") == "min" else value > best
