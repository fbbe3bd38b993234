"""Summed losses and their normalisers, so the loop can divide by a whole window's global target count.

A task's ``loss_sum(outputs, batch)`` is the *sum* of per-target losses of a micro-batch and
``loss_weight(batch)`` the number (or weight) of its targets, computed from the labels alone so that the
loop knows the window's total before the first forward pass. ``sum(loss_sum) / sum(loss_weight)`` over an
accumulation window across all ranks equals the mean loss of one big batch holding the whole window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
"""Label id of positions that carry no loss (padding, continuation sub-tokens, prompt tokens)."""


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over every position whose label is not :data:`IGNORE` (fp32 logits)."""
    labels = labels.to(logits.device)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def token_count(labels: torch.Tensor) -> torch.Tensor:
    """How many positions carry a loss (a device tensor: no host sync)."""
    return (labels != IGNORE).sum()


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets: the logits of positions ``0..T-2`` against the labels of ``1..T-1``."""
    return logits[:, :-1], labels[:, 1:]
