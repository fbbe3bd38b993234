"""Capacity planner: per-GPU memory, fit, largest micro-batch, tokens/s, time and cost of a job.

``plan_job(config)`` plans a :class:`~distributed_ft.config.schema.JobConfig`; ``PlanReport.to_json()`` is
the ``dft plan --json`` object and ``PlanReport.format_table()`` the text report. Formulas and their
sources are in ``planning/README.md``. Only the standard library is imported here; transformers and torch
are imported when a model config is read.
"""

from distributed_ft.planning.lora import lora_target_modules, lora_trainable_params
from distributed_ft.planning.memory import (
    BufferModel,
    MemoryEstimate,
    activation_bytes,
    estimate_memory,
    state_bytes_per_rank,
)
from distributed_ft.planning.models import (
    ModelShape,
    shape_from_config,
    shape_from_dims,
    shape_from_pretrained,
)
from distributed_ft.planning.planner import plan, plan_job, train_tokens
from distributed_ft.planning.recommend import Capacity, evaluate, recommend
from distributed_ft.planning.report import PlanReport
from distributed_ft.planning.spec import TrainingSetup, setup_from_job
from distributed_ft.planning.throughput import DEVICES, DeviceSpec, device_spec, flops_per_token

__all__ = [
    "DEVICES",
    "BufferModel",
    "Capacity",
    "DeviceSpec",
    "MemoryEstimate",
    "ModelShape",
    "PlanReport",
    "TrainingSetup",
    "activation_bytes",
    "device_spec",
    "estimate_memory",
    "evaluate",
    "flops_per_token",
    "lora_target_modules",
    "lora_trainable_params",
    "plan",
    "plan_job",
    "recommend",
    "setup_from_job",
    "shape_from_config",
    "shape_from_dims",
    "shape_from_pretrained",
    "state_bytes_per_rank",
    "train_tokens",
]
