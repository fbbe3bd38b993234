"""Optimizer and learning-rate schedule shared by every engine."""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import get_scheduler

from distributed_ft.config.schema import TrainConfig
from distributed_ft.modeling.peft import head_modules, layer_stack

log = logging.getLogger("distributed_ft")


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


def parameter_depths(model: nn.Module) -> tuple[dict[int, int], int]:
    """``({id(param): depth}, layers)``: each parameter's depth in the stack of transformer layers.

    0 below the layers (embeddings), ``i + 1`` in layer ``i``, ``layers + 1`` above them (in registration
    order: a final norm, a pooler, the head).
    """
    _, stack = layer_stack(model)
    layer_of = {id(p): i for i, layer in enumerate(stack) for p in layer.parameters()}
    depths, above = {}, False
    for param in model.parameters():
        if id(param) in layer_of:
            depths[id(param)], above = layer_of[id(param)] + 1, True
        else:
            depths[id(param)] = len(stack) + 1 if above else 0
    return depths, len(stack)


def layerwise_groups(model: nn.Module, train: TrainConfig, task: str) -> list[dict]:
    """AdamW groups by depth (``train.layer_lr_decay``) and for the head (``train.head_lr``).

    Each rate is split into decayed matrices and undecayed 1-D tensors (highest rates first).
    """
    decay = train.layer_lr_decay or 1.0
    depths, layers = parameter_depths(model)
    heads = tuple(head_modules(_inner_model(model), task))
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_head = any(f".{h}." in f".{name}" for h in heads)
        lr = (
            train.head_lr
            if in_head and train.head_lr
            else train.lr * decay ** (layers + 1 - depths[id(param)])
        )
        weight_decay = train.weight_decay if full_ndim(param) >= 2 else 0.0
        groups.setdefault((lr, weight_decay), []).append(param)
    ordered = sorted(groups.items(), key=lambda item: (-item[0][0], -item[0][1]))
    return [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in ordered]


def _inner_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (whose top-level children are the task's)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def build_optimizer(model: nn.Module, train: TrainConfig, task: str) -> torch.optim.Optimizer:
    """Torch AdamW, fused when asked for and supported; groups by depth when learning rates differ."""
    if train.layer_lr_decay is not None or train.head_lr is not None:
        groups = layerwise_groups(model, train, task)
        rates = sorted({g["lr"] for g in groups})
        log.info("optimizer: %d parameter groups, lr %.3g to %.3g", len(groups), rates[0], rates[-1])
    else:
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


def scheduled_lr(scheduler, base_lr: float) -> float:
    """``train.lr`` as the schedule has it now (every group follows the same multiplier of its own rate)."""
    return base_lr * scheduler.get_last_lr()[0] / scheduler.base_lrs[0]


def tensor_bytes(tensors) -> int:
    """Total bytes of the given tensors (``None`` entries are skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
