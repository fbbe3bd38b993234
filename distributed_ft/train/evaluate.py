"""Distributed evaluation: each rank predicts its share, rank 0 scores every example exactly once."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import torch

from distributed_ft.data.sources import ArrowBatchSource
from distributed_ft.engine.base import Engine
from distributed_ft.runtime.context import RuntimeContext
from distributed_ft.runtime.tracking import Progress
from distributed_ft.tasks.base import Generates, Task
from distributed_ft.train.step import model_inputs, to_device


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
    loss_sum = torch.zeros((), dtype=torch.float64, device=context.device)
    loss_weight = torch.zeros((), dtype=torch.float64, device=context.device)
    last_batch = None
    batches = progress.wrap(iter(source), total=len(source), desc=desc) if progress else iter(source)
    for batch in batches:
        meta = batch.pop("meta")
        batch = to_device(batch, context.device)
        outputs = engine.forward(model_inputs(batch))
        loss_sum += task.loss_sum(outputs, batch).to(torch.float64)
        loss_weight += task.loss_weight(batch).to(torch.float64)
        predictions.extend(task.predictions(outputs, {**batch, "meta": meta}))
        last_batch = batch
    for _ in range(most_batches - len(source)):
        engine.forward(model_inputs(last_batch if last_batch is not None else _any_batch(split, task)))
    # every rank generates (ZeRO-3 forwards are collective)
    generated = task.generate_samples(engine.module, split) if isinstance(task, Generates) else None
    engine.train(True)
    loss_sum, loss_weight = torch.stack([loss_sum, loss_weight]).tolist()
    gathered = context.all_gather_object((predictions, loss_sum, loss_weight))
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
