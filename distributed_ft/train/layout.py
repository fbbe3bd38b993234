"""How one optimizer step is split over the ranks that run it, kept across a change of world size.

A step is ``lanes`` micro-batches of ``train.batch_size`` examples (:mod:`distributed_ft.data.shards`);
each of ``W`` ranks takes ``lanes / W`` of them (its ``grad_accum``). The lanes are fixed when a run
starts (``W x train.grad_accum``, or ``max x train.grad_accum`` for an elastic ``run.num_workers``) and
kept in every checkpoint, so a run resumed on another number of ranks keeps its global batch, its
sample order and its schedule: ``grad_accum`` is the knob that moves, and the log says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from distributed_ft.config.schema import JobConfig
from distributed_ft.errors import CheckpointError

log = logging.getLogger("distributed_ft")


@dataclass(frozen=True)
class StepLayout:
    """Micro-batches per optimizer step (``lanes``) and this world size's share of them."""

    lanes: int
    grad_accum: int


def step_layout(config: JobConfig, world_size: int, saved_source: dict[str, int] | None = None) -> StepLayout:
    """The layout of this run on ``world_size`` ranks, continuing ``saved_source`` (a checkpoint's position).

    Raises:
        CheckpointError: The checkpoint's global batch cannot be split over ``world_size`` ranks, or it
            was written with another ``train.batch_size``.
    """
    batch = config.train.batch_size
    if saved_source is not None and "lanes" in saved_source:
        lanes = saved_source["lanes"]
        if saved_source.get("batch_size", batch) != batch:
            raise CheckpointError(
                f"the checkpoint was trained with train.batch_size={saved_source['batch_size']}; resume with "
                "it (the data position and the global batch are counted in its micro-batches)"
            )
    else:
        high = config.run.worker_range[1]
        lanes = (high if config.run.elastic else world_size) * config.train.grad_accum
    if lanes % world_size:
        divisors = [n for n in range(1, lanes + 1) if lanes % n == 0]
        raise CheckpointError(
            f"the run's global batch is {lanes} micro-batches of {batch} per step, which {world_size} ranks "
            f"cannot split evenly; resume on {', '.join(map(str, divisors))} ranks"
        )
    layout = StepLayout(lanes=lanes, grad_accum=lanes // world_size)
    if layout.grad_accum != config.train.grad_accum:
        log.warning(
            "train.grad_accum %d -> %d: %d ranks keep the global batch of %d micro-batches x %d examples",
            config.train.grad_accum,
            layout.grad_accum,
            world_size,
            lanes,
            batch,
        )
    return layout


def with_grad_accum(config: JobConfig, grad_accum: int) -> JobConfig:
    """``config`` with ``train.grad_accum`` replaced (validation is not re-run: the rest is unchanged)."""
    return config.model_copy(update={"train": config.train.model_copy(update={"grad_accum": grad_accum})})
