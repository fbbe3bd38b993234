"""Put the pieces together: memory, fit, largest micro-batch, tokens/s, time, cost and a recommendation."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from distributed_ft.errors import ConfigError
from distributed_ft.planning.memory import BufferModel, GiB
from distributed_ft.planning.models import ModelShape, shape_from_pretrained
from distributed_ft.planning.recommend import Capacity, evaluate, recommend
from distributed_ft.planning.report import PlanReport
from distributed_ft.planning.spec import TrainingSetup, setup_from_job
from distributed_ft.planning.throughput import device_spec, flops_per_token, predict_throughput

if TYPE_CHECKING:
    from distributed_ft.config.schema import JobConfig


def _time(tokens: int | None, tokens_per_s: float, setup: TrainingSetup, price: float) -> dict[str, Any]:
    if tokens is None:
        return {"seconds": None, "gpu_hours": None, "cost": None, "tokens": None, "optimizer_steps": None}
    seconds = tokens / tokens_per_s
    gpu_hours = seconds / 3600 * setup.world_size
    per_step = setup.micro_batch * setup.grad_accum * setup.world_size * setup.seq_len
    return {
        "seconds": seconds,
        "gpu_hours": gpu_hours,
        "cost": gpu_hours * price,
        "tokens": int(tokens),
        "optimizer_steps": math.ceil(tokens / per_step),
    }


def plan(
    shape: ModelShape,
    setup: TrainingSetup,
    *,
    gpu_type: str = "H100-80GB",
    gpu_memory_gb: float = 80,
    host_memory_gb: float = 1024,
    price_per_gpu_hour: float = 0.0,
    num_train_tokens: int | None = None,
    measured_tokens_per_s: float | None = None,
    mfu: float | None = None,
    buffers: BufferModel | None = None,
) -> PlanReport:
    """Plan one setup on a cluster of ``setup.world_size`` devices of ``gpu_type``.

    Args:
        shape: The model (see :mod:`distributed_ft.planning.models`).
        setup: The training setup.
        gpu_type: A name from :data:`~distributed_ft.planning.throughput.DEVICES` (aliases accepted).
        gpu_memory_gb: Memory per device in GiB (as ``nvidia-smi`` reports it, divided by 1024).
        host_memory_gb: Host RAM per node in GiB.
        price_per_gpu_hour: Price of one device for one hour.
        num_train_tokens: Tokens (padding included) to train on; ``None`` leaves time and cost empty.
        measured_tokens_per_s: Measured job-wide tokens/s; replaces the FLOPs prediction.
        mfu: Assumed fraction of peak FLOP/s (default: the device's, 0.4 for GPUs).
        buffers: Overrides for the buffer model (DeepSpeed bucket sizes, overheads).
    """
    device = device_spec(gpu_type)
    bm = buffers or BufferModel()
    if device.name == "CPU":
        bm = dataclasses.replace(bm, host_process_bytes=0, comm_bytes=0)
        setup = setup.replace(device="cpu")
    capacity = Capacity(
        device_bytes=int(gpu_memory_gb * GiB),
        host_bytes=int(host_memory_gb * GiB),
        context_bytes=device.context_bytes,
        buffers=bm,
    )
    ev = evaluate(shape, setup, capacity)
    trainable = setup.trainable_params(shape)
    model_flops, hw_flops = flops_per_token(
        shape,
        setup.seq_len,
        trainable_params=trainable,
        full_finetune=setup.full_finetune,
        gradient_checkpointing=setup.gradient_checkpointing,
        adversarial_steps=setup.adversarial_steps,
    )
    notes = _notes(setup, ev.memory.model_load_per_node, capacity)
    try:
        peak = device.peak_flops(setup.compute_dtype)
    except ConfigError as exc:
        notes.append(f"{exc}; throughput assumes the fp32 peak")
        peak = device.peak_fp32
    throughput = predict_throughput(
        model_flops,
        hw_flops,
        peak,
        setup.world_size,
        utilization=mfu if mfu is not None else device.default_mfu,
        measured_tokens_per_s=measured_tokens_per_s,
    )
    throughput["peak_source"] = device.source
    setup_json = setup.to_json()
    setup_json.update(
        trainable_params=trainable,
        stored_params=setup.stored_params(shape),
        gpu_type=device.name,
        gpu_memory_bytes=capacity.device_bytes,
        host_memory_bytes=capacity.host_bytes,
        price_per_gpu_hour=price_per_gpu_hour,
    )
    if num_train_tokens is None:
        notes.append("time and cost need the number of training tokens (num_train_tokens or dataset_tokens)")
    return PlanReport(
        model=shape.to_json(),
        setup=setup_json,
        memory={"per_gpu": ev.memory.per_gpu(), "host": ev.memory.host(capacity.host_bytes)},
        fits=ev.fits,
        max_micro_batch=ev.max_micro_batch,
        throughput=throughput,
        time=_time(num_train_tokens, throughput["tokens_per_s"], setup, price_per_gpu_hour),
        recommendation=recommend(shape, setup, capacity),
        notes=notes,
    )


def _notes(setup: TrainingSetup, load_bytes: int, capacity: Capacity) -> list[str]:
    notes = []
    if setup.engine == "torch" and setup.zero_stage > 0:
        notes.append("run.engine=torch does not shard: deepspeed.* settings are ignored (ZeRO stage 0)")
    if setup.offload_optimizer or setup.offload_param:
        notes.append("offload slows steps (PCIe transfers, CPU Adam); tokens/s does not model that")
    if setup.peft_method not in ("none", "lora", "freeze"):
        notes.append(f"{setup.peft_method} adapters are counted as zero parameters (they are tiny)")
    if setup.adversarial_steps:
        notes.append(
            f"adversarial training ({setup.adversarial_steps} perturbation step(s)): FLOPs per token include "
            f"its {setup.adversarial_steps + 1} forwards and extra backwards; memory holds two forwards' "
            "activations"
        )
    if setup.world_size > 1:
        notes.append("communication time is not modeled separately; it is part of the assumed MFU")
    if load_bytes > capacity.host_bytes:
        notes.append(
            f"loading the model needs {load_bytes / GiB:,.0f} GiB of host RAM per node, more than the "
            f"{capacity.host_bytes / GiB:,.0f} GiB there: ZeRO-3 (run.engine=deepspeed "
            "deepspeed.zero_stage=3) builds it partitioned, each rank holding only its share"
        )
    return notes


def train_tokens(
    config: JobConfig,
    setup: TrainingSetup,
    *,
    num_train_tokens: int | None = None,
    dataset_tokens: int | None = None,
) -> int | None:
    """Tokens the job will process: given, or ``train.max_steps`` x tokens per step, or epochs x dataset.

    Without ``dataset_tokens``, ``data.max_train_samples x data.max_length`` bounds an epoch when set.
    """
    if num_train_tokens is not None:
        return num_train_tokens
    per_step = setup.micro_batch * setup.grad_accum * setup.world_size * setup.seq_len
    if config.train.max_steps is not None:
        return config.train.max_steps * per_step
    if dataset_tokens is None and config.data.max_train_samples is not None:
        dataset_tokens = config.data.max_train_samples * config.data.max_length
    if dataset_tokens is None:
        return None
    return math.ceil(config.train.epochs * dataset_tokens)


def plan_job(
    config: JobConfig,
    *,
    num_train_tokens: int | None = None,
    measured_tokens_per_s: float | None = None,
    mfu: float | None = None,
    dataset_tokens: int | None = None,
    model_shape: ModelShape | None = None,
    model_source: str | None = None,
    num_labels: int | None = None,
    flash_attention: bool = False,
    partition_frozen_params: bool = True,
    buffers: BufferModel | None = None,
) -> PlanReport:
    """Plan a :class:`~distributed_ft.config.schema.JobConfig` on its ``cluster`` section.

    Args:
        config: The job config.
        num_train_tokens: Tokens to train on (overrides ``train.max_steps`` and epochs).
        measured_tokens_per_s: Measured job-wide tokens/s; replaces the FLOPs prediction.
        mfu: Assumed fraction of peak FLOP/s (default 0.4 on GPUs).
        dataset_tokens: Tokens in one epoch of the training data (times ``train.epochs``).
        model_shape: A ready shape; skips reading the model config.
        model_source: Where to read the model config instead of ``model.name`` (e.g. a resolved builtin).
        num_labels: Classification labels (default: the model config's ``num_labels``).
        flash_attention: Fused attention (no ``s^2`` activations).
        partition_frozen_params: Whether ZeRO-3 partitions frozen base weights under PEFT.
        buffers: Overrides for the buffer model.

    Raises:
        ConfigError: for a model config that cannot be read or an unknown GPU type.
    """
    shape = model_shape or shape_from_pretrained(
        model_source or config.model.name, config.task, num_labels=num_labels, revision=config.model.revision
    )
    setup = setup_from_job(
        config, flash_attention=flash_attention, partition_frozen_params=partition_frozen_params
    )
    cluster = config.cluster
    return plan(
        shape,
        setup,
        gpu_type=cluster.gpu_type,
        gpu_memory_gb=cluster.gpu_memory_gb,
        host_memory_gb=cluster.host_memory_gb,
        price_per_gpu_hour=cluster.price_per_gpu_hour,
        num_train_tokens=train_tokens(
            config, setup, num_train_tokens=num_train_tokens, dataset_tokens=dataset_tokens
        ),
        measured_tokens_per_s=measured_tokens_per_s,
        mfu=mfu,
        buffers=buffers,
    )
