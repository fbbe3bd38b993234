"""Distributed evaluation: each rank predicts its share, rank 0 scores every example exactly once."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import torch

from distributed_ft.data.sources import ArrowBatchSource
from distributed_ft.engine.base import Engine
from distributed_ft.runtime.context import RuntimeContext
from distributed_ft.runtime.tracking import Progress
from distributed_ft.tasks.base import Task


def eval_source(split: pa.Table, task: Task, batch_size: int, context: RuntimeContext) -> ArrowBatchSource:
    """Length-sorted batches, split across ranks without dropping or duplicating any example."""
    return ArrowBatchSource(
        split,
        lambda rows: task.collate(rows, with_meta=True),
        batch_size,
        shuffle=False,
        rank=context.rank,
        world_size=context.world_size,
        even_batches=False,
    )


@torch.no_grad()
def evaluate(
    engine: Engine,
    task: Task,
    split: pa.Table,
    labels: list[str],
    context: RuntimeContext,
    *,
    batch_size: int,
    progress: Progress | None = None,
    desc: str = "eval",
) -> dict[str, Any]:
    """Metrics of the engine's model on ``split``, identical on every rank.

    Ranks with fewer batches repeat their last batch (results discarded) so that collective operations
    inside the forward pass (ZeRO-3 gathers, DDP buffer syncs) stay matched across ranks.
    """
    source = eval_source(split, task, batch_size, context)
    most_batches = max(context.all_gather_object(len(source)))
    engine.train(False)
    predictions: list[tuple[int, Any]] = []
    loss_sum, loss_tokens = 0.0, 0
    last_batch = None
    batches = progress.wrap(iter(source), total=len(source), desc=desc) if progress else iter(source)
    for batch in batches:
        meta = batch.pop("meta")
        outputs = engine.forward(batch)
        tokens = int((batch["labels"] != -100).sum()) if "labels" in batch else len(meta)
        loss_sum += float(task.loss(outputs, batch)) * tokens
        loss_tokens += tokens
        predictions.extend(task.predictions(outputs, {**batch, "meta": meta}))
        last_batch = batch
    for _ in range(most_batches - len(source)):
        engine.forward(last_batch if last_batch is not None else _any_batch(split, task))
    samples = getattr(task, "generate_samples", None)  # every rank generates (ZeRO-3 forwards are collective)
    generated = samples(engine.module, split) if samples is not None else None
    engine.train(True)
    gathered = context.all_gather_object((predictions, loss_sum, loss_tokens))
    metrics = None
    if context.is_main:
        merged = {example_id: pred for preds, _, _ in gathered for example_id, pred in preds}
        metrics = task.score(merged, split, labels)
        total_tokens = sum(n for _, _, n in gathered)
        metrics["loss"] = sum(s for _, s, _ in gathered) / max(total_tokens, 1)
        if generated:
            metrics["samples"] = generated
    return context.broadcast_object(metrics)


def _any_batch(split: pa.Table, task: Task) -> dict[str, Any]:
    """A one-example batch for a rank that got no evaluation batch at all (tiny splits, many ranks)."""
    source = ArrowBatchSource(split.slice(0, 1), task.collate, 1, shuffle=False)
    return next(iter(source))
