"""Plain PyTorch engine: one process, or DistributedDataParallel when the context has several ranks."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distributed_ft.config.schema import JobConfig
from distributed_ft.engine.optim import build_optimizer, build_scheduler, scheduled_lr, tensor_bytes
from distributed_ft.errors import ConfigError
from distributed_ft.modeling.peft import load_trainable_state_dict, trainable_state_dict
from distributed_ft.runtime.context import RuntimeContext
from distributed_ft.runtime.safe_load import load_checked

log = logging.getLogger("distributed_ft")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_STATE_FILE = "engine_state.pt"
"""Optimizer, schedule and loss-scaler state (``weights_only`` loadable)."""
_MODEL_FILE = "model.safetensors"
"""The model's (trainable) weights."""


class TorchEngine:
    """AdamW + schedule + optional autocast/DDP; the loop normalises the loss of an accumulation window."""

    def __init__(self, config: JobConfig, context: RuntimeContext) -> None:
        self.config, self.context = config, context
        precision = config.train.mixed_precision
        if precision == "fp16" and context.device.type != "cuda":
            raise ConfigError("train.mixed_precision=fp16 needs a GPU; use bf16 (or no) on CPU")
        self._autocast_dtype = _AUTOCAST_DTYPES.get(precision)
        self._scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self._model: nn.Module | None = None
        self._wrapped: nn.Module | None = None

    @property
    def module(self) -> nn.Module:
        assert self._model is not None, "prepare() first"
        return self._model

    def model_construction(self, hidden_size: int | None) -> contextlib.AbstractContextManager:
        del hidden_size
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module, total_steps: int) -> None:
        self._model = model.to(self.context.device)
        self._wrapped = self._model
        if self.context.world_size > 1:
            device_ids = [self.context.device.index] if self.context.device.type == "cuda" else None
            self._wrapped = DistributedDataParallel(self._model, device_ids=device_ids)
        self.optimizer = build_optimizer(self._model, self.config.train, self.config.task)
        self.scheduler = build_scheduler(self.optimizer, self.config.train, total_steps)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast region for forward passes (a no-op in full precision)."""
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.context.device.type, dtype=self._autocast_dtype)

    def forward(self, batch: dict[str, torch.Tensor], sync_grads: bool = True, bare: bool = False) -> Any:
        batch = {k: v.to(self.context.device, non_blocking=True) for k, v in batch.items()}
        model = self.module if bare else self._wrapped
        if isinstance(model, DistributedDataParallel):
            model.require_backward_grad_sync = sync_grads
        with self.autocast():
            return model(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        (self._scaler.scale(loss) if self._scaler else loss).backward()

    def step(self) -> torch.Tensor | None:
        norm = None
        if self._scaler:
            self._scaler.unscale_(self.optimizer)
        max_norm = self.config.train.max_grad_norm
        if max_norm is not None:  # a device tensor: read by the loop only when it logs
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm).detach()
        if self._scaler:
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return float(scheduled_lr(self.scheduler, self.config.train.lr))

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def save(self, directory: Path) -> None:
        if not self.context.is_main:  # DDP replicas are identical: rank 0 writes for all
            return
        weights = trainable_state_dict(self.module)  # adapter-only when the base is frozen
        # own CPU copies: safetensors refuses tensors that share memory (tied embeddings)
        save_file(
            {k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()},
            directory / _MODEL_FILE,
        )
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self._scaler.state_dict() if self._scaler else None,
        }
        torch.save(state, directory / _STATE_FILE)

    def load(self, directory: Path, weights_only: bool = False) -> None:
        load_trainable_state_dict(
            self.module, load_file(directory / _MODEL_FILE, device=str(self.context.device))
        )
        if weights_only:
            return
        state = load_checked(directory / _STATE_FILE, map_location=self.context.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self._scaler and state["scaler"]:
            self._scaler.load_state_dict(state["scaler"])

    def export(self, directory: Path) -> None:
        if self.context.is_main:
            self.module.save_pretrained(directory)

    def state_bytes(self) -> dict[str, int]:
        params = list(self.module.parameters())
        optimizer_states = [t for s in self.optimizer.state.values() for t in s.values() if t.ndim > 0]
        return {
            "parameters": tensor_bytes(params),
            "gradients": tensor_bytes(p.grad for p in params),
            "optimizer_states": tensor_bytes(optimizer_states),
        }


def inference_precision(precision: str, device: torch.device) -> str:
    """The autocast precision inference runs with: the training one where ``device`` supports it.

    fp16 autocast needs CUDA; a model trained with it is evaluated in full precision elsewhere.
    """
    if precision == "fp16" and device.type != "cuda":
        log.info("train.mixed_precision=fp16 needs a GPU; running inference on %s in full precision", device)
        return "no"
    return precision


def inference_engine(model: nn.Module, config: JobConfig, context: RuntimeContext) -> TorchEngine:
    """A TorchEngine that only runs forward passes (evaluation and prediction of a trained model)."""
    precision = inference_precision(config.train.mixed_precision, context.device)
    train = config.train.model_copy(update={"mixed_precision": precision})
    engine = TorchEngine(config.model_copy(update={"train": train}), context)
    engine._model = engine._wrapped = model.to(context.device).eval()
    return engine
