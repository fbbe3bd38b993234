"""The training setup the planner evaluates: what runs where, in which precision, with which PEFT method."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from distributed_ft.errors import ConfigError
from distributed_ft.planning.lora import lora_target_modules, lora_trainable_params
from distributed_ft.planning.models import ModelShape

_DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
PEFT_METHODS = ("none", "lora", "ia3", "prompt_tuning", "prefix_tuning", "freeze")


@dataclass(frozen=True)
class TrainingSetup:
    """One candidate configuration (mirrors the job-config keys it comes from).

    Precision follows the engine: DeepSpeed with ``bf16``/``fp16`` keeps 16-bit weights and gradients plus
    fp32 master weights in the optimizer (ZeRO paper's mixed precision); the torch engine keeps weights in
    ``model_dtype`` and autocasts compute to ``mixed_precision``. The torch engine never shards (stage 0).
    """

    task: str = "token_classification"
    seq_len: int = 256
    micro_batch: int = 16
    grad_accum: int = 1
    gpus_per_node: int = 1
    nodes: int = 1
    engine: str = "deepspeed"
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    peft_method: str = "none"
    lora_r: int = 8
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None
    train_head: bool | None = None
    gradient_checkpointing: bool = False
    adversarial_steps: int = 0
    """Perturbation steps of ``train.adversarial`` per micro-batch: 0 off, 1 FGM, PGD its ``steps``."""
    model_dtype: str = "float32"
    mixed_precision: str = "no"
    flash_attention: bool = False
    partition_frozen_params: bool = True
    device: str = "cuda"

    def __post_init__(self) -> None:
        if self.engine not in ("torch", "deepspeed"):
            raise ConfigError(f"engine must be 'torch' or 'deepspeed', got {self.engine!r}")
        if not 0 <= self.zero_stage <= 3:
            raise ConfigError(f"zero_stage must be 0-3, got {self.zero_stage}")
        if self.offload_param and self.stage != 3:
            raise ConfigError("offload_param needs zero_stage=3 with the deepspeed engine")
        if self.offload_optimizer and self.stage == 0:
            raise ConfigError("offload_optimizer needs zero_stage >= 1 with the deepspeed engine")
        if self.peft_method not in PEFT_METHODS:
            raise ConfigError(f"unknown peft method {self.peft_method!r}; expected one of {PEFT_METHODS}")
        if self.model_dtype not in _DTYPE_SHORT or self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"unsupported precision {self.model_dtype!r} / {self.mixed_precision!r}")

    @property
    def world_size(self) -> int:
        """Data-parallel ranks (one per device)."""
        return self.gpus_per_node * self.nodes

    @property
    def stage(self) -> int:
        """The ZeRO stage that actually applies (0 under the torch engine)."""
        return self.zero_stage if self.engine == "deepspeed" else 0

    @property
    def compute_dtype(self) -> str:
        """``bf16``, ``fp16`` or ``fp32``: the dtype matmuls and saved activations use."""
        if self.mixed_precision != "no":
            return self.mixed_precision
        return _DTYPE_SHORT[self.model_dtype]

    @property
    def compute_bytes(self) -> int:
        """Bytes per activation element."""
        return 4 if self.compute_dtype == "fp32" else 2

    @property
    def mask_bytes(self) -> int:
        """Bytes per dropout-mask element: CUDA's fused dropout keeps bools, CPU keeps a scaled float mask."""
        return self.compute_bytes if self.device == "cpu" else 1

    @property
    def precision(self) -> str:
        """State precision for :func:`~distributed_ft.planning.memory.state_bytes_per_rank`."""
        if self.engine == "deepspeed":
            return self.compute_dtype
        short = _DTYPE_SHORT[self.model_dtype]
        return "fp32" if short == "fp32" else f"{short}-pure"

    @property
    def autocast_copies(self) -> bool:
        """Whether autocast keeps 16-bit copies of fp32 weights alive through the backward pass."""
        return self.engine == "torch" and self.model_dtype == "float32" and self.mixed_precision != "no"

    @property
    def full_finetune(self) -> bool:
        """Whether every base weight is trained."""
        return self.peft_method == "none"

    def head_trained(self) -> bool:
        """Whether the task head is trained under PEFT (default: yes for classification tasks)."""
        return self.train_head if self.train_head is not None else self.task != "causal_lm"

    def adapter_params(self, shape: ModelShape) -> int:
        """Parameters PEFT adds (LoRA A/B matrices; other adapters are treated as negligible)."""
        if self.peft_method != "lora":
            return 0
        return lora_trainable_params(shape, self.lora_r, self.target_modules)

    def adapter_dropout_inputs(self, shape: ModelShape) -> int:
        """Summed input width of one layer's LoRA-adapted modules when LoRA dropout is on, else 0."""
        if self.peft_method != "lora" or self.lora_dropout == 0:
            return 0
        widths = sum(m.in_features for m in lora_target_modules(shape, self.target_modules) if "." in m.name)
        return widths // max(shape.num_layers, 1)

    def trainable_params(self, shape: ModelShape) -> int:
        """Parameters that get gradients and optimizer states."""
        if self.full_finetune:
            return shape.total_params
        head = shape.head_params if self.head_trained() else 0
        return self.adapter_params(shape) + head

    def stored_params(self, shape: ModelShape) -> int:
        """Parameters held in memory: the base, adapters, and PEFT's trainable copy of the head."""
        if self.full_finetune:
            return shape.total_params
        copy = shape.head_params if self.peft_method != "freeze" and self.head_trained() else 0
        return shape.total_params + self.adapter_params(shape) + copy

    def persistent_params(self, shape: ModelShape, threshold: int) -> int:
        """Parameters in tensors below ``threshold`` elements, adapters included (ZeRO-3 keeps them whole)."""
        small = shape.params_below(threshold)
        if self.peft_method == "lora":
            for m in lora_target_modules(shape, self.target_modules):
                small += sum(
                    n for n in (self.lora_r * m.in_features, self.lora_r * m.out_features) if n < threshold
                )
        return small

    def replace(self, **changes: Any) -> TrainingSetup:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """Plain-dict view, including the derived fields."""
        out = dataclasses.asdict(self)
        out["target_modules"] = list(self.target_modules) if self.target_modules is not None else None
        out.update(
            world_size=self.world_size,
            effective_zero_stage=self.stage,
            precision=self.precision,
            compute_dtype=self.compute_dtype,
            global_batch=self.micro_batch * self.grad_accum * self.world_size,
        )
        return out


def adversarial_steps(train: Any) -> int:
    """Perturbation steps ``train.adversarial*`` runs per micro-batch (0: no adversarial training)."""
    method = getattr(train, "adversarial", "none")
    if method == "none":
        return 0
    return int(train.adversarial_steps) if method == "pgd" else 1


def setup_from_job(config: Any, **overrides: Any) -> TrainingSetup:
    """Build a :class:`TrainingSetup` from a ``JobConfig``; keyword arguments override fields."""
    targets = config.peft.target_modules
    values: dict[str, Any] = {
        "task": config.task,
        "seq_len": config.data.max_length,
        "micro_batch": config.train.batch_size,
        "grad_accum": config.train.grad_accum,
        "gpus_per_node": config.cluster.gpus_per_node,
        "nodes": config.cluster.nodes,
        "engine": config.run.engine,
        "zero_stage": config.deepspeed.zero_stage,
        "offload_optimizer": config.deepspeed.offload_optimizer and config.run.engine == "deepspeed",
        "offload_param": config.deepspeed.offload_param and config.run.engine == "deepspeed",
        "peft_method": config.peft.method,
        "lora_r": config.peft.r,
        "lora_dropout": config.peft.dropout,
        "target_modules": tuple(targets) if targets is not None else None,
        "gradient_checkpointing": config.model.gradient_checkpointing,
        "adversarial_steps": adversarial_steps(config.train),
        "model_dtype": config.model.dtype,
        "mixed_precision": config.train.mixed_precision,
    }
    values.update(overrides)
    return TrainingSetup(**values)
