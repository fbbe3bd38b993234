"""One optimizer step as a unit, and the device-side tallies the loop reads once per log window.

``train_step`` takes the micro-batches of one accumulation window, fetched up front. The loss of each
micro-batch is its *summed* per-target loss divided by the window's target count summed over every rank
(one all-reduce, on the device), times the world size because DDP and ZeRO average gradients across
ranks. So ``batch_size=4, grad_accum=4`` gives the gradients of ``batch_size=16``, a partial window at the
end of an epoch is normalised by its own targets, and ranks with more targets weigh more.

Nothing here reads a device value on the host: losses, target and token counts stay tensors on
``context.device`` and are added up in :class:`StepTally`, which the loop reads at ``log_every`` (and at
checkpoints) with one all-reduce and one ``tolist()``. The stop request (SIGTERM, pre-emption) rides on
that same reduction, so every rank learns it at the same step without an extra synchronisation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distributed_ft.data.sources import Batch
from distributed_ft.engine.base import Engine
from distributed_ft.runtime.context import RuntimeContext
from distributed_ft.tasks.base import Task
from distributed_ft.train.adversarial import Adversary

LABELS = "labels"


def windows(batches: Iterator[Batch], size: int) -> Iterator[list[Batch]]:
    """Consecutive groups of ``size`` batches; the last group of an epoch may be shorter."""
    window: list[Batch] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch's tensors on ``device`` (asynchronous from pinned memory on CUDA)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def model_inputs(batch: Batch) -> Batch:
    """What the model's forward receives: the task computes the loss from the logits and the labels."""
    return {k: v for k, v in batch.items() if k != LABELS}


@dataclass
class StepOutput:
    """Device tensors of one optimizer step (this rank's share); nothing here has been read on the host."""

    loss_sum: torch.Tensor
    loss_weight: torch.Tensor
    tokens: torch.Tensor
    samples: int
    grad_norm: torch.Tensor | float | None


def micro_batch_seeds(seed: int, step: int, lanes: Sequence[int]) -> list[int]:
    """The torch seed of each micro-batch of optimizer step ``step``: a function of its lane, not its rank.

    Dropout then draws the same masks for a micro-batch whichever rank computes it, so a run resumed on
    another number of ranks continues the same losses (and no RNG state has to travel with a rank).
    """
    return [int(np.random.SeedSequence([seed, step, lane]).generate_state(1)[0]) for lane in lanes]


def train_step(
    engine: Engine,
    task: Task,
    window: list[Batch],
    context: RuntimeContext,
    seeds: Sequence[int] | None = None,
    adversary: Adversary | None = None,
) -> StepOutput:
    """Forward and backward over every micro-batch of ``window``, then one optimizer step.

    ``seeds``: the torch seed set before each micro-batch's forward (:func:`micro_batch_seeds`).
    ``adversary``: adversarial training (``train.adversarial``): each micro-batch backpropagates the
    mean of its clean and adversarial loss (still one ``engine.backward``); the tallied loss is the clean
    one.
    """
    window = [to_device(batch, context.device) for batch in window]
    weights = torch.stack([task.loss_weight(batch).to(torch.float64) for batch in window]).sum()
    global_weight = context.all_reduce(weights.clone().to(context.device))
    scale = context.world_size / global_weight.clamp(min=1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=context.device)
    tokens = torch.zeros((), dtype=torch.float64, device=context.device)
    for index, batch in enumerate(window):
        seed, sync = None if seeds is None else seeds[index], index == len(window) - 1

        def forward(
            bare: bool = False, batch: Batch = batch, seed: int | None = seed, sync: bool = sync
        ) -> torch.Tensor:
            if seed is not None:  # host-side: no device sync (CUDA generators are seeded lazily)
                torch.manual_seed(seed)
            inputs = model_inputs(batch)  # the plain call unless asked: engines may predate ``bare``
            outputs = (
                engine.forward(inputs, sync, bare=True) if bare else engine.forward(inputs, sync_grads=sync)
            )
            return task.loss_sum(outputs, batch)

        summed, objective = adversary.losses(forward) if adversary is not None else (forward(),) * 2
        engine.backward(objective * scale.to(objective.dtype))
        loss_sum += summed.detach().to(torch.float64)
        tokens += batch["attention_mask"].sum()
    grad_norm = engine.step()
    samples = sum(len(batch["input_ids"]) for batch in window)
    return StepOutput(loss_sum, weights, tokens, samples, grad_norm)


class StepTally:
    """Sums of step outputs since the last read, kept on the device; read with one collective.

    Args:
        context: Where the sums live and across which ranks they are reduced.
    """

    _FIELDS = ("loss_sum", "loss_weight", "tokens", "grad_norm", "samples", "stop")

    def __init__(self, context: RuntimeContext) -> None:
        self.context = context
        self._sums = self._zeros()
        self._grad_norm: float | None = None
        self._device_norm = False
        self._started = time.perf_counter()

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(len(self._FIELDS), dtype=torch.float64, device=self.context.device)

    def add(self, step: StepOutput) -> None:
        """Add one step (device arithmetic only)."""
        norm = step.grad_norm
        self._device_norm = isinstance(norm, torch.Tensor)
        norm_value = norm.detach().to(self._sums) if self._device_norm else self._sums.new_zeros(())
        if not self._device_norm:  # an engine that already returned a host number (DeepSpeed)
            self._grad_norm = None if norm is None else float(norm)
        values = [step.loss_sum, step.loss_weight.to(self._sums), step.tokens, norm_value]
        self._sums[:4] += torch.stack([v.to(self._sums) for v in values])
        self._sums[3] = norm_value  # the last step's norm, not a sum
        self._sums[4] += step.samples  # a host int added on the device: no sync

    def restart_clock(self) -> None:
        """Start timing anew (after an evaluation or a checkpoint, which are not training throughput)."""
        self._started = time.perf_counter()

    def read(self) -> dict[str, Any]:
        """Global sums since the last read (every rank calls this at the same step), then start anew.

        Returns:
            ``loss_sum``, ``loss_weight``, ``tokens`` and ``samples`` (summed over all ranks),
            ``grad_norm`` of the last step, ``seconds`` since the last read (the slowest rank's: the
            reduction waits for it) and ``stop`` (whether any rank was asked to stop).
        """
        stop = self.context.stop_requested_locally()
        self._sums[5] = 1.0 if stop else 0.0
        totals = self.context.all_reduce(self._sums).tolist()  # the one host sync of a window
        now = time.perf_counter()
        record = dict(zip(self._FIELDS, totals, strict=True))
        world = self.context.world_size
        record["grad_norm"] = record["grad_norm"] / world if self._device_norm else self._grad_norm
        record["stop"] = record["stop"] > 0
        record["samples"] = int(record["samples"])
        record["seconds"] = max(now - self._started, 1e-9)
        self._sums = self._zeros()
        self._started = now
        return record


class LogWindow:
    """What the log line of a window reports: tallies read since the last log line, combined on the host."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.loss_sum = self.loss_weight = self.tokens = self.seconds = 0.0
        self.samples = 0

    def add(self, read: dict[str, Any]) -> None:
        self.loss_sum += read["loss_sum"]
        self.loss_weight += read["loss_weight"]
        self.tokens += read["tokens"]
        self.samples += read["samples"]
        self.seconds += read["seconds"]

    def flush(self) -> dict[str, float]:
        """The window's global mean loss per target, tokens and samples (all ranks) and their rates."""
        record = {
            "loss": self.loss_sum / max(self.loss_weight, 1.0),
            "tokens": int(self.tokens),
            "samples": self.samples,
            "tokens_per_s": self.tokens / max(self.seconds, 1e-9),
            "samples_per_s": self.samples / max(self.seconds, 1e-9),
        }
        self.restart()
        return record
