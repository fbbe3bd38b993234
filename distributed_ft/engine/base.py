"""The Engine seam: everything the loop asks of the thing that owns the model and the optimizer."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Engine(Protocol):
    """One optimisation step, split where the loop needs to see it.

    The loop calls, per micro-batch, ``forward(batch, sync_grads=boundary)`` then ``backward(loss)``, and
    ``step()`` once at each gradient-accumulation boundary. The loss handed to ``backward`` is already
    normalised over the whole window (``train/step.py``): engines do not scale it for accumulation.
    """

    @property
    def module(self) -> nn.Module:
        """The unwrapped model (for evaluation, prediction and export)."""
        ...

    def model_construction(self, hidden_size: int | None) -> AbstractContextManager:
        """The context the model is built in (ZeRO-3: partitioned as it is constructed and loaded)."""
        ...

    def prepare(self, model: nn.Module, total_steps: int) -> None:
        """Take ownership of ``model``: move, wrap, build optimizer and schedule."""
        ...

    def forward(self, batch: dict[str, torch.Tensor], sync_grads: bool = True, bare: bool = False) -> Any:
        """Run the model on ``batch`` (moved to the device, under autocast when configured).

        ``bare``: the unwrapped model (no DDP / DeepSpeed forward hooks), for a loss that is only
        differentiated with ``torch.autograd.grad`` or joins the backward of a later wrapped forward
        (adversarial training, ``train/adversarial.py``): no reduction or micro-step accounting sees it.
        """
        ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> torch.Tensor | float | None:
        """Clip, step the optimizer and the schedule, zero gradients; returns the gradient norm.

        The norm may be a device tensor: the loop reads it on the host only when it logs.
        """
        ...

    @property
    def lr(self) -> float: ...

    def train(self, mode: bool = True) -> None: ...

    def save(self, directory: Path) -> None:
        """Write model, optimizer and schedule state into ``directory`` (every rank calls this)."""
        ...

    def load(self, directory: Path, weights_only: bool = False) -> None:
        """Restore what :meth:`save` wrote; ``weights_only`` (export) may read another world size."""
        ...

    def export(self, directory: Path) -> None:
        """Write a consolidated ``save_pretrained`` model into ``directory`` (every rank calls this)."""
        ...

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds in parameters, gradients and optimizer states (counted from tensors)."""
        ...
