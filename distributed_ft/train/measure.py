"""Measure a short real job for ``dft plan --validate``: model states, activations, RSS and step times.

:func:`validate_plan` builds the job's task, engine and model (PEFT applied) as training does, takes a
few optimizer steps on synthetic full-length batches (``train.batch_size`` x ``data.max_length``: the
shape the planner assumes) and measures each rank:

* **parameters, gradients, optimizer states**: ``engine.state_bytes()`` right before the optimizer step
  of step 1 (gradients alive, AdamW's moments created at step 0), and right after it;
* **activations**: bytes of the tensors autograd saves during one forward pass and loss
  (:class:`SavedTensorMeter`);
* process RSS (current and peak), the CUDA peak reserved memory, every step's wall time.

The comparison with the plan and its report are ``planning/validate.py``'s.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from distributed_ft.config.schema import JobConfig
from distributed_ft.engine import build_engine
from distributed_ft.engine.deepspeed_engine import deepspeed_estimate
from distributed_ft.planning.validate import Measurement, Reference, ValidationReport, compare
from distributed_ft.runtime.context import RuntimeContext
from distributed_ft.tasks import get_task
from distributed_ft.train.job import build_model


def rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """The largest resident set size this process has had (``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class SavedTensorMeter:
    """Bytes of the tensors autograd saves for backward inside the ``with`` block.

    Each storage is counted once (views of one buffer share it); parameters, including ZeRO-3 parameters
    gathered for the forward pass, are left out: they are model states, not activations.
    """

    def __init__(self, model: nn.Module) -> None:
        self._param_storages = {
            p.untyped_storage().data_ptr()
            for p in model.parameters()
            if p.numel() and p.device.type != "meta"
        }
        self._seen: dict[tuple[str, int], int] = {}
        self._hooks: Any = None

    def _is_parameter(self, tensor: torch.Tensor) -> bool:
        if isinstance(tensor, nn.Parameter) or hasattr(tensor, "ds_id"):
            return True
        return tensor.untyped_storage().data_ptr() in self._param_storages

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel() and not self._is_parameter(tensor):
            storage = tensor.untyped_storage()
            self._seen.setdefault((str(tensor.device), storage.data_ptr()), storage.nbytes())
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @property
    def bytes(self) -> int:
        """Saved bytes so far."""
        return sum(self._seen.values())

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def synthetic_batch(
    task: str, model: nn.Module, batch_size: int, seq_len: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """A full-length batch of random token ids with labels of the right shape for ``task``."""
    cfg = model.config
    vocab = int(cfg.vocab_size)
    low = min(1000, vocab // 2)  # past the special tokens of BERT-like vocabularies
    ids = torch.randint(low, vocab, (batch_size, seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    num_labels = int(getattr(cfg, "num_labels", 2))
    if task == "token_classification":
        batch["labels"] = torch.randint(0, num_labels, ids.shape, generator=generator)
    elif task == "sequence_classification":
        if getattr(cfg, "problem_type", None) == "multi_label_classification":
            batch["labels"] = torch.randint(0, 2, (batch_size, num_labels), generator=generator).float()
        else:
            batch["labels"] = torch.randint(0, num_labels, (batch_size,), generator=generator)
    else:
        batch["labels"] = ids.clone()
    return batch


def measure(
    config: JobConfig,
    context: RuntimeContext,
    model: nn.Module,
    engine: Any,
    loss: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor],
    *,
    steps: int = 3,
) -> Measurement:
    """Take ``steps`` (>= 2) optimizer steps on synthetic batches and measure this rank.

    Step 0 creates the optimizer states; step 1 is measured (saved tensors in its forward pass, model
    states before its optimizer step); the others are only timed. ``model`` is the unwrapped model the
    engine was prepared with.
    """
    steps = max(steps, 2)
    generator = torch.Generator().manual_seed(1234 + context.rank)
    batch_size, seq_len = config.train.batch_size, config.data.max_length
    batches = [synthetic_batch(config.task, model, batch_size, seq_len, generator) for _ in range(steps)]
    cuda = context.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(context.device)
    engine.train(True)
    times: list[float] = []
    before = after = {}
    activations = 0
    for index, batch in enumerate(batches):
        metered = index == 1
        if cuda:
            torch.cuda.synchronize(context.device)
        started = time.perf_counter()
        if metered:
            with SavedTensorMeter(model) as meter:
                value = loss(engine.forward(batch), batch)
            activations = meter.bytes
        else:
            value = loss(engine.forward(batch), batch)
        engine.backward(value)
        if metered:
            before = engine.state_bytes()
        engine.step()
        if metered:
            after = engine.state_bytes()
        if cuda:
            torch.cuda.synchronize(context.device)
        times.append(time.perf_counter() - started)
    return Measurement(
        rank=context.rank,
        state_bytes=dict(before),
        state_bytes_after_step=dict(after),
        activations=activations,
        rss_bytes=rss_bytes(),
        peak_rss_bytes=peak_rss_bytes(),
        step_seconds=times,
        device_peak_reserved=torch.cuda.max_memory_reserved(context.device) if cuda else None,
    )


def validate_plan(
    config: JobConfig,
    context: RuntimeContext,
    *,
    labels: list[str] | None = None,
    steps: int = 3,
    reference: Reference | None = deepspeed_estimate,
) -> ValidationReport:
    """Run a short real job and compare the planner's per-rank memory with what each rank holds.

    Every rank must call this (the engine's collectives); every rank gets the same report.

    Args:
        config: The job config (``train.batch_size`` and ``data.max_length`` set the batch shape).
        context: Where this process runs.
        labels: The head's labels (default: the task's own, as ``train.job.build_model`` picks them).
        steps: Optimizer steps to take (at least 2; the first two are not timed).
        reference: Another estimator to show beside the planner (default DeepSpeed's; ``None``: none).
    """
    steps = max(steps, 2)
    task, engine = get_task(config), build_engine(config, context)
    model = build_model(config, task, labels, engine)
    num_labels = getattr(model.config, "num_labels", None) if config.task != "causal_lm" else None
    reference_row = reference(model, config, context.world_size) if reference else None
    engine.prepare(model, total_steps=steps)

    def mean_loss(outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return task.loss_sum(outputs, batch) / task.loss_weight(batch).clamp(min=1)

    own = measure(config, context, engine.module, engine, mean_loss, steps=steps)
    ranks = [Measurement(**m) for m in context.all_gather_object(own.to_json())]
    return compare(
        config,
        ranks,
        device_type=context.device.type,
        num_labels=num_labels,
        ds_config=getattr(engine, "ds_config", None),
        reference=reference_row,
        steps=steps,
    )
