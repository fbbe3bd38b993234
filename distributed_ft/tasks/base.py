"""The Task seam: what the loop, evaluation and prediction need to know about a task."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa
import torch
from torch import nn

from distributed_ft.config.schema import JobConfig
from distributed_ft.data.builtin import resolve
from distributed_ft.data.prepare import (
    Preparation,
    PreparedDataset,
    cache_dir_for,
    fingerprint,
    hash_tokenizer,
    input_stats,
    prepare,
)
from distributed_ft.data.sources import Batch
from distributed_ft.runtime.context import LocalContext
from distributed_ft.runtime.tracking import Progress


class Task(Protocol):
    """A task: its data encoding, model head, loss, predictions and metrics."""

    name: str
    metrics: dict[str, str]
    """Metric name -> ``"max"`` or ``"min"``: what ``eval.metric`` may be and which way is better."""

    def cache_key(self, tokenizer: Any, splits: dict[str, str], labels: list[str] | None = None) -> str:
        """The cache key of ``prepare_data``'s result, without reading the data (a ``stat`` per file).

        Also checks the configuration, so a bad job fails here, before any rank starts preparing.
        """
        ...

    def prepare_data(
        self,
        tokenizer: Any,
        splits: dict[str, str],
        labels: list[str] | None = None,
        key: str | None = None,
    ) -> PreparedDataset:
        """The cached encoding of ``{split: path}`` under ``key`` (default: :meth:`cache_key`).

        On a miss the inputs are read, validated and encoded (``labels`` fixed when given) by the one
        process that takes the key's lock; the others wait for its result.
        """
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


@runtime_checkable
class PreparesTokenizer(Protocol):
    """A task that changes the tokenizer before encoding or inference (added marker tokens, a chat template).

    Called wherever a tokenizer meets the task, also where the data was prepared elsewhere (Ray workers).
    """

    def prepare_tokenizer(self, tokenizer: Any) -> Any: ...


@runtime_checkable
class Generates(Protocol):
    """A generative task: ``dft predict`` decodes text, and evaluation adds a few generated samples."""

    def generate(
        self, model: nn.Module, encoded: pa.Table, batch_size: int, progress: Any = None
    ) -> dict[int, Any]:
        """Generated output per example id of ``encoded``."""
        ...

    def generate_samples(self, model: nn.Module, split: pa.Table) -> dict[str, list[str]] | None:
        """A few prompts and their generations for the metrics log (every rank calls it: ZeRO-3)."""
        ...


def preparation_progress(config: JobConfig) -> Callable[..., Iterable[Any]]:
    """A progress bar over encoded chunks for the process that prepares (``run.progress``)."""
    return Progress(config.run.progress, LocalContext()).wrap


def input_key(
    task: str,
    config: JobConfig,
    tokenizer: Any,
    splits: dict[str, str],
    labels: list[str] | None,
    **options: Any,
) -> str:
    """A cache key: inputs by path, size and mtime, the tokenizer, given labels, limits and ``options``."""
    data = config.data
    return fingerprint(
        {
            "task": task,
            "files": {split: input_stats(resolve(path)) for split, path in splits.items()},
            "tokenizer": hash_tokenizer(tokenizer),
            "labels": labels,
            "max_length": data.max_length,
            "limits": [data.max_train_samples, data.max_eval_samples, data.max_test_samples],
            **(training_set_options(config) if "train" in splits else {}),
            **options,
        }
    )


def training_set_options(config: JobConfig) -> dict[str, Any]:
    """The few-shot and augmentation keys (and the seed they draw with) when either is on, else nothing.

    Off, they add nothing to the cache key, so caches prepared without them stay valid.
    """
    data = config.data
    shots = getattr(data, "shots_per_label", None)
    augment = getattr(data, "augment", None)
    augmented = augment is not None and augment.multiplier > 0
    if not shots and not augmented:
        return {}
    return {
        "training_set": {
            "shots_per_label": shots,
            "augment": augment.model_dump() if augmented else None,
            "seed": config.train.seed,
        }
    }


def shaped_training_set(
    train: pa.Table,
    config: JobConfig,
    few_shot: Callable[[pa.Table, int, int], tuple[pa.Table, str]],
    augment: Callable[[pa.Table, Any, int], tuple[pa.Table, Any]],
    unit: str,
) -> tuple[pa.Table, list[str]]:
    """Few-shot selection, then augmentation, of the training ``unit``s (a log line for each step).

    Args:
        train: The training split as read (after ``data.max_train_samples``).
        config: The job (``data.shots_per_label``, ``data.augment``, ``train.seed``).
        few_shot: The task's k-per-label sampler: ``(table, k, seed) -> (table, note)``.
        augment: The task's augmenter: ``(table, options, seed) -> (table, stats)``.
        unit: What the rows are called in the log lines (``sentences``, ``examples``).
    """
    data, seed, notes = config.data, config.train.seed, []
    if data.shots_per_label:
        train, note = few_shot(train, data.shots_per_label, seed)
        notes.append(note)
    if data.augment.multiplier:
        train, stats = augment(train, data.augment, seed)
        notes.append(stats.describe(unit))
    return train, notes


def cached(config: JobConfig, key: str, build: Callable[[], Preparation]) -> PreparedDataset:
    """The prepared dataset of ``key`` in ``data.cache_dir``; ``build`` reads the inputs on a miss."""
    data = config.data
    return prepare(
        cache_dir_for(data),
        key,
        build,
        shard_rows=data.shard_rows,
        num_proc=data.num_proc,
        progress=preparation_progress(config),
    )


def metric_improved(task: Task, metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of ``metric`` beats ``best``, in the direction the task declares for it."""
    if best is None:
        return True
    return value < best if task.metrics.get(metric, "max") == "min" else value > best
