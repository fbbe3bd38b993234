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
    grads_after_reduction: bool = False,
    persistent_params: int = 0,
) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer states (AdamW) one data-parallel rank holds at its peak.

    ZeRO (Rajbhandari et al. 2020): stage 1 partitions optimizer states, stage 2 also gradients, stage 3
    also parameters, each ``/ world_size``. Mixed precision (``bf16``/``fp16``) is 2 bytes weights, 2 bytes
    gradients and K=12 bytes of optimizer state (fp32 master, momentum, variance). ``fp32`` is 4 + 4 + 8,
    except that DeepSpeed (stages 1-3) updates a cloned fp32 flat partition: 4 more bytes per trainable
    element and rank, counted as optimizer state. ``*-pure`` is torch-only 16-bit training without masters
    (2 + 2 + 4). Frozen parameters get no gradients or states. Partitions are rounded up (ZeRO pads flat
    buffers to a multiple of the world size; the difference is negligible).

    Args:
        param_count_total: All stored parameters (frozen ones included).
        trainable: Parameters with ``requires_grad``.
        world_size: Data-parallel ranks.
        zero_stage: 0-3.
        precision: ``fp32``, ``bf16``, ``fp16``, ``bf16-pure`` or ``fp16-pure``.
        partition_frozen_params: Whether ZeRO-3 also partitions the frozen base weights.
        grads_after_reduction: Stage 1 holds full gradients through the backward pass (the peak) and only
            its partition once they are reduced; ``True`` returns the latter.
        persistent_params: Parameters ZeRO-3 keeps whole on every rank besides their partition (tensors
            below ``stage3_param_persistence_threshold``; see :meth:`ModelShape.params_below`).

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
    if precision == "fp32" and zero_stage > 0:
        master = 4
    frozen = param_count_total - trainable
    if zero_stage < 3:
        parameters = weight * param_count_total
    else:
        frozen_held = _shard(frozen, world_size) if partition_frozen_params else frozen
        parameters = weight * (_shard(trainable, world_size) + frozen_held + persistent_params)
    full_grads = zero_stage == 0 or (zero_stage == 1 and not grads_after_reduction)
    gradients = grad * (trainable if full_grads else _shard(trainable, world_size))
    optimizer = (master + adam) * (trainable if zero_stage == 0 else _shard(trainable, world_size))
    return {"parameters": parameters, "gradients": gradients, "optimizer_states": optimizer}


def activation_bytes(
    shape: ModelShape,
    seq_len: int,
    micro_batch: int,
    *,
    compute_bytes: int = 2,
    mask_bytes: int = 1,
    autocast: bool = False,
    gradient_checkpointing: bool = False,
    flash_attention: bool = False,
    task: str = "token_classification",
    frozen_base: bool = False,
    adapter_inputs: int = 0,
) -> int:
    """Activations saved for the backward pass on one rank (bytes).

    Per layer, Korthikanti et al. 2022 count ``s b h (34 + 5 a s / h)`` bytes in 16-bit. Written per saved
    tensor with element size ``e``, dropout-mask size ``m`` and MLP width ``I`` (see README): ``s b h`` times
    ``6e`` (QKV input, Q, K, V, out-projection input, MLP input) ``+ 2 norm + 2m``, plus ``2e s b I`` (the
    activation's input and the down-projection input; ``4e`` for a gated MLP), plus
    ``a s^2 b (softmax + m + e)``. With ``I = 4h``, ``e = 2``, ``m = 1`` and LayerNorm this is exactly
    Korthikanti's formula. Dropout terms vanish for models without dropout; fused (flash) attention keeps no
    ``s^2`` tensors. Under autocast, norms and softmax save fp32 and each projection saves its own 16-bit
    copy of a shared input. RMSNorm (HF) saves its input and the normalized fp32 tensor; llama-style eager
    attention saves an fp32 softmax. With gradient checkpointing only each layer's input (``e s b h``) is
    kept, plus one layer being recomputed. The head adds its input, the returned logits, fp32
    log-probabilities and their gradient. A frozen base (PEFT) does not save the inputs of the
    out-projection and the two MLP projections (``e (2h + I)``); ``adapter_inputs`` is the summed input
    width of the adapted modules of one layer whose LoRA dropout saves a mask and a dropped copy.
    """
    s, b, h, a, e, m = seq_len, micro_batch, shape.hidden_size, shape.num_heads, compute_bytes, mask_bytes
    wide = 4 if autocast else e  # dtype of norm and softmax outputs
    rms = shape.norm == "rmsnorm"
    norm = wide + (4 if rms else 0)
    softmax = (4 if rms or autocast else e) + (e if (rms or autocast) and e < 4 else 0)
    hidden_mask = 2 * m if shape.hidden_dropout else 0
    input_copies = 3 if autocast and shape.gated_mlp else 0
    mlp = (shape.act_saved + (3 if shape.gated_mlp else 1)) * e * shape.intermediate_size
    per_token = e * (6 + input_copies) * h + (2 * norm + hidden_mask) * h + mlp
    if frozen_base:
        per_token += (e + m) * adapter_inputs - e * (2 * h + shape.intermediate_size)
    if flash_attention:
        per_token += 4 * a  # softmax statistics (log-sum-exp) per head
    else:
        per_token += a * s * (softmax + (m + e if shape.attention_dropout else 0))
    layer = s * b * per_token
    kept = e * s * b * h if gradient_checkpointing else layer
    body = shape.num_layers * kept + (layer if gradient_checkpointing else 0)
    head_tokens = b if task == "sequence_classification" else s * b
    head = head_tokens * (e * h + (e + 8) * shape.output_size)
    edges = s * b * h * (2 * e + (2 * m if shape.hidden_dropout else 0))  # embedding norm, final norm, masks
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
        persistence_threshold: DeepSpeed ``stage3_param_persistence_threshold`` (smaller tensors stay whole).
    """

    context_bytes: int | None = None
    comm_bytes: int = 512 * MiB
    fraction: float = 0.10
    reduce_bucket_elements: int = 500_000_000
    prefetch_bucket_elements: int = 50_000_000
    overlap_comm: bool = False
    ddp_bucket_view: bool = False
    host_process_bytes: int = 3 * GiB
    persistence_threshold: int = 100_000


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

    @property
    def host_peak_per_node(self) -> int:
        """Host RAM one node needs at its peak: steady state or model loading, whichever is larger."""
        return max(self.host_per_node, self.model_load_per_node)

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
            "fits": self.host_peak_per_node <= available_per_node,
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
        stored,
        trainable,
        world,
        stage,
        precision,
        partition_frozen_params=setup.partition_frozen_params,
        persistent_params=setup.persistent_params(shape, bm.persistence_threshold) if stage == 3 else 0,
    )
    params, grads, optim = states["parameters"], states["gradients"], states["optimizer_states"]
    weight_b, grad_b = STATE_BYTES[precision][:2]
    part = _shard(trainable, world)
    host_p = host_g = host_o = pinned = 0
    if setup.offload_optimizer:
        host_o, optim = optim, 0
        host_g = 4 * part  # fp32 gradient partition the CPU optimizer reads
        if stage >= 2:
            grads = 0
        else:
            pinned = weight_b * part  # staging buffer for the updated partition
    if setup.offload_param:  # persistent parameters stay on the device
        persistent = setup.persistent_params(shape, bm.persistence_threshold) * weight_b
        host_p, params = params - persistent, persistent

    act = activation_bytes(
        shape,
        setup.seq_len,
        b,
        compute_bytes=setup.compute_bytes,
        mask_bytes=setup.mask_bytes,
        autocast=setup.mixed_precision != "no" and setup.model_dtype == "float32",
        gradient_checkpointing=setup.gradient_checkpointing,
        flash_attention=setup.flash_attention,
        task=setup.task,
        frozen_base=not setup.full_finetune,
        adapter_inputs=setup.adapter_dropout_inputs(shape),
    )
    if setup.adversarial_steps:
        act *= 2  # the clean graph is kept for the one backward through it and the adversarial graph
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
        model_load_per_node=model_load_bytes_per_node(setup, stored),
    )


def model_load_bytes_per_node(setup: TrainingSetup, stored: int) -> int:
    """Host RAM the ranks of one node hold while the model is built and its weights loaded.

    ZeRO-3 (``run.engine=deepspeed``) constructs under ``deepspeed.zero.Init``: each rank only ever holds
    its partition. Every other path builds the whole model on every rank before anything is sharded.
    Memory-mapped weight files (safetensors) live in the shared page cache and are not counted.
    """
    weight_bytes = 4 if setup.model_dtype == "float32" else 2
    per_rank = stored
    if setup.engine == "deepspeed" and setup.stage == 3:
        per_rank = _shard(stored, setup.world_size)
    return setup.gpus_per_node * per_rank * weight_bytes


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
