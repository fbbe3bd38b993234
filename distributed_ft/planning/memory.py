"""Per-rank memory formulas: model states under ZeRO, activations, buffers and host RAM.

Sources and assumptions are written up in ``planning/README.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distributed_ft.errors import ConfigError
from distributed_ft.planning.models import ModelShape
from distributed_ft.planning.spec import TrainingSetup

GiB = 1024**3
MiB = 1024**2

# Bytes per element: (weights, gradients, fp32 master copy, Adam moments) for each state precision.
STATE_BYTES: dict[str, tuple[int, int, int, int]] = {
    "fp32": (4, 4, 0, 8),
    "bf16": (2, 2, 4, 8),
    "fp16": (2, 2, 4, 8),
    "bf16-pure": (2, 2, 0, 4),
    "fp16-pure": (2, 2, 0, 4),
}


def _shard(count: int, world_size: int) -> int:
    """Elements one rank holds of a flat buffer split ``world_size`` ways (rounded up, as ZeRO pads)."""
    return -(-count // world_size)


def state_bytes_per_rank(
    param_count_total: int,
    trainable: int,
    world_size: int,
    zero_stage: int,
    precision: str,
    *,
    partition_frozen_params: bool = True,
) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer states (AdamW) one data-parallel rank holds.

    ZeRO (Rajbhandari et al. 2020): stage 1 partitions optimizer states, stage 2 also gradients, stage 3
    also parameters, each ``/ world_size``. Mixed precision (``bf16``/``fp16``) is 2 bytes weights, 2 bytes
    gradients and K=12 bytes of optimizer state (fp32 master, momentum, variance). ``fp32`` is 4 + 4 + 8,
    except that DeepSpeed stages 1-2 clone the fp32 partition they update (4 more bytes per trainable
    element, counted as optimizer state); stage 3 updates its fp32 partition in place. ``*-pure`` is
    torch-only 16-bit training without masters (2 + 2 + 4). Frozen parameters get no gradients or states.

    Args:
        param_count_total: All stored parameters (frozen ones included).
        trainable: Parameters with ``requires_grad``.
        world_size: Data-parallel ranks.
        zero_stage: 0-3.
        precision: ``fp32``, ``bf16``, ``fp16``, ``bf16-pure`` or ``fp16-pure``.
        partition_frozen_params: Whether ZeRO-3 also partitions the frozen base weights.

    Returns:
        ``{"parameters": int, "gradients": int, "optimizer_states": int}`` in bytes.
    """
    if precision not in STATE_BYTES:
        raise ConfigError(f"unknown precision {precision!r}; expected one of {', '.join(STATE_BYTES)}")
    if not 0 <= zero_stage <= 3:
        raise ConfigError(f"zero_stage must be 0-3, got {zero_stage}")
    if world_size < 1 or trainable < 0 or trainable > param_count_total:
        raise ConfigError("need world_size >= 1 and 0 <= trainable <= param_count_total")
    if precision.endswith("-pure") and zero_stage > 0:
        raise ConfigError("pure 16-bit states without fp32 masters exist only at zero_stage 0 (torch engine)")
    weight, grad, master, adam = STATE_BYTES[precision]
    if precision == "fp32" and zero_stage in (1, 2):
        master = 4
    frozen = param_count_total - trainable
    if zero_stage < 3:
        parameters = weight * param_count_total
    else:
        frozen_held = _shard(frozen, world_size) if partition_frozen_params else frozen
        parameters = weight * (_shard(trainable, world_size) + frozen_held)
    gradients = grad * (trainable if zero_stage < 2 else _shard(trainable, world_size))
    optimizer = (master + adam) * (trainable if zero_stage == 0 else _shard(trainable, world_size))
    return {"parameters": parameters, "gradients": gradients, "optimizer_states": optimizer}


def activation_bytes(
    shape: ModelShape,
    seq_len: int,
    micro_batch: int,
    *,
    compute_bytes: int = 2,
    gradient_checkpointing: bool = False,
    flash_attention: bool = False,
    task: str = "token_classification",
) -> int:
    """Activations saved for the backward pass on one rank.

    Per layer (Korthikanti et al. 2022, 16-bit): ``s b h (34 + 5 a s / h)`` bytes. Written for element size
    ``e`` and MLP width ``I``: ``s b [(8e + 2) h + 2e I] + (2e + 1) a s^2 b``; the ``+2``/``+1`` are the
    1-byte dropout masks; a gated MLP (SwiGLU) saves ``4e I`` instead of ``2e I``. With ``I = 4h``, ``e = 2``
    this is exactly ``34 s b h + 5 a s^2 b``. Fused (flash) attention keeps no ``s^2`` matrices. With
    gradient checkpointing only each layer's input (``e s b h``) is kept, plus one layer recomputed at a
    time. The head adds its logits, an fp32 copy, fp32 log-probabilities and their gradient.
    """
    s, b, h, e = seq_len, micro_batch, shape.hidden_size, compute_bytes
    mlp = (4 if shape.gated_mlp else 2) * e * shape.intermediate_size
    per_token = (8 * e + 2) * h + mlp
    scores = 4 * shape.num_heads if flash_attention else (2 * e + 1) * shape.num_heads * s
    layer = s * b * (per_token + scores)
    if gradient_checkpointing:
        body = shape.num_layers * e * s * b * h + layer
    else:
        body = shape.num_layers * layer
    head_tokens = b if task == "sequence_classification" else s * b
    head = head_tokens * shape.output_size * (e + 8 + (4 if e < 4 else 0))
    edges = s * b * h * (1 + e)  # embedding dropout mask, final-norm input
    return body + head + edges


@dataclass(frozen=True)
class BufferModel:
    """Framework and communication memory beyond model states and activations.

    Attributes:
        context_bytes: CUDA context, cuBLAS/cuDNN workspaces (``None``: the device table's value).
        comm_bytes: NCCL communicators and their channels, when more than one rank.
        fraction: Allocator fragmentation and backward temporaries, as a fraction of states + activations.
        reduce_bucket_elements: DeepSpeed ``reduce_bucket_size`` (ZeRO allocates it in full).
        prefetch_bucket_elements: DeepSpeed ``stage3_prefetch_bucket_size``.
        overlap_comm: DeepSpeed ``overlap_comm`` (doubles the ZeRO-1/2 gradient bucket).
        ddp_bucket_view: DDP ``gradient_as_bucket_view`` (otherwise buckets copy every gradient).
        host_process_bytes: Host RAM of one training process (Python, torch, CUDA host libraries).
    """

    context_bytes: int | None = None
    comm_bytes: int = 512 * MiB
    fraction: float = 0.10
    reduce_bucket_elements: int = 500_000_000
    prefetch_bucket_elements: int = 50_000_000
    overlap_comm: bool = False
    ddp_bucket_view: bool = False
    host_process_bytes: int = 3 * GiB


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one device and on the host for one setup and micro-batch."""

    parameters: int
    gradients: int
    optimizer_states: int
    activations: int
    buffers: int
    host_parameters: int = 0
    host_gradients: int = 0
    host_optimizer_states: int = 0
    host_pinned_buffers: int = 0
    host_process: int = 0
    ranks_per_node: int = 1
    model_load_per_node: int = 0

    @property
    def total(self) -> int:
        """Everything on one device."""
        return self.parameters + self.gradients + self.optimizer_states + self.activations + self.buffers

    @property
    def host_per_rank(self) -> int:
        """Host RAM one rank needs."""
        return (
            self.host_parameters
            + self.host_gradients
            + self.host_optimizer_states
            + self.host_pinned_buffers
            + self.host_process
        )

    @property
    def host_per_node(self) -> int:
        """Host RAM one node needs in steady state."""
        return self.host_per_rank * self.ranks_per_node

    def per_gpu(self) -> dict[str, int]:
        """The ``memory.per_gpu`` object of the JSON report."""
        return {
            "parameters": self.parameters,
            "gradients": self.gradients,
            "optimizer_states": self.optimizer_states,
            "activations": self.activations,
            "buffers": self.buffers,
            "total": self.total,
        }

    def host(self, available_per_node: int) -> dict[str, Any]:
        """The ``memory.host`` object of the JSON report."""
        return {
            "per_rank": {
                "parameters": self.host_parameters,
                "gradients": self.host_gradients,
                "optimizer_states": self.host_optimizer_states,
                "pinned_buffers": self.host_pinned_buffers,
                "process": self.host_process,
                "total": self.host_per_rank,
            },
            "per_node": self.host_per_node,
            "model_load_per_node": self.model_load_per_node,
            "available_per_node": available_per_node,
            "fits": self.host_per_node <= available_per_node,
        }


def estimate_memory(
    shape: ModelShape,
    setup: TrainingSetup,
    *,
    micro_batch: int | None = None,
    context_bytes: int = GiB,
    buffers: BufferModel | None = None,
) -> MemoryEstimate:
    """Device and host memory of one rank for ``setup`` (at ``micro_batch`` if given)."""
    bm = buffers or BufferModel()
    b = setup.micro_batch if micro_batch is None else micro_batch
    world, stage, precision = setup.world_size, setup.stage, setup.precision
    trainable, stored = setup.trainable_params(shape), setup.stored_params(shape)
    states = state_bytes_per_rank(
        stored, trainable, world, stage, precision, partition_frozen_params=setup.partition_frozen_params
    )
    params, grads, optim = states["parameters"], states["gradients"], states["optimizer_states"]
    weight_b, grad_b = STATE_BYTES[precision][:2]
    part = _shard(trainable, world)
    host_p = host_g = host_o = pinned = 0
    if setup.offload_optimizer:
        host_o, optim = optim, 0
        if stage == 3 and precision == "fp32":
            host_o += 4 * part  # the offloaded fp32 partition is a copy, not the parameter partition
        host_g = 4 * part  # fp32 gradient partition the CPU optimizer reads
        if stage >= 2:
            grads = 0
        else:
            pinned = weight_b * part  # staging buffer for the updated partition
    if setup.offload_param:
        host_p, params = params, 0

    act = activation_bytes(
        shape,
        setup.seq_len,
        b,
        compute_bytes=setup.compute_bytes,
        gradient_checkpointing=setup.gradient_checkpointing,
        flash_attention=setup.flash_attention,
        task=setup.task,
    )
    extra = bm.context_bytes if bm.context_bytes is not None else context_bytes
    if world > 1:
        extra += bm.comm_bytes
    if setup.engine == "torch":
        extra += grad_b * trainable if world > 1 and not bm.ddp_bucket_view else 0
    elif stage == 0:
        extra += grad_b * min(trainable, bm.reduce_bucket_elements) if world > 1 else 0
    elif stage in (1, 2):
        extra += grad_b * bm.reduce_bucket_elements * (2 if bm.overlap_comm else 1)
    else:
        extra += grad_b * bm.reduce_bucket_elements
        extra += weight_b * min(stored, 2 * shape.params_per_layer + bm.prefetch_bucket_elements)
    if setup.autocast_copies:
        extra += 2 * shape.matmul_params
    extra += int(bm.fraction * (params + grads + optim + act))
    return MemoryEstimate(
        parameters=params,
        gradients=grads,
        optimizer_states=optim,
        activations=act,
        buffers=extra,
        host_parameters=host_p,
        host_gradients=host_g,
        host_optimizer_states=host_o,
        host_pinned_buffers=pinned,
        host_process=bm.host_process_bytes,
        ranks_per_node=setup.gpus_per_node,
        model_load_per_node=setup.gpus_per_node * stored * (4 if setup.model_dtype == "float32" else 2),
    )


def largest_fitting(fits: Callable[[int], bool], limit: int = 1 << 16) -> int:
    """The largest ``n`` in ``[1, limit]`` with ``fits(n)`` for a monotone predicate; 0 when none fits."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
