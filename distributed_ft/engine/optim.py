"""Optimizer and learning-rate schedule shared by every engine."""

from __future__ import annotations

import torch
from torch import nn
from transformers import get_scheduler

from distributed_ft.config.schema import TrainConfig


def full_ndim(param: nn.Parameter) -> int:
    """Dimensions of the whole parameter (a ZeRO-3 partition's placeholder is 1-D; ``ds_shape`` is not)."""
    return len(getattr(param, "ds_shape", param.shape))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases and normalisation weights (1-D tensors)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if full_ndim(param) >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """Torch AdamW, fused when asked for and supported."""
    groups = parameter_groups(model, train.weight_decay)
    if train.fused_optimizer:
        try:
            return torch.optim.AdamW(groups, lr=train.lr, fused=True)
        except (RuntimeError, ValueError):  # e.g. a device or dtype without a fused kernel
            pass
    return torch.optim.AdamW(groups, lr=train.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    """Linear, cosine or constant schedule with ``warmup_ratio`` of ``total_steps`` as warmup."""
    warmup = round(train.warmup_ratio * total_steps)
    name = "constant_with_warmup" if train.scheduler == "constant" else train.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def tensor_bytes(tensors) -> int:
    """Total bytes of the given tensors (``None`` entries are skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
