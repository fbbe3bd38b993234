"""Does a setup fit, how large can the micro-batch be, and which setup to recommend."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from distributed_ft.errors import ConfigError
from distributed_ft.planning.memory import BufferModel, GiB, MemoryEstimate, estimate_memory, largest_fitting
from distributed_ft.planning.models import ModelShape
from distributed_ft.planning.spec import TrainingSetup


@dataclass(frozen=True)
class Capacity:
    """Memory available to one rank on its device and to one node on the host, in bytes."""

    device_bytes: int
    host_bytes: int
    context_bytes: int = GiB
    buffers: BufferModel = dataclasses.field(default_factory=BufferModel)


@dataclass(frozen=True)
class Evaluation:
    """Memory of a setup at its micro-batch, whether it fits, and the largest micro-batch that does."""

    setup: TrainingSetup
    memory: MemoryEstimate
    fits: bool
    max_micro_batch: int


def memory_at(
    shape: ModelShape, setup: TrainingSetup, capacity: Capacity, micro_batch: int
) -> MemoryEstimate:
    """Memory estimate of ``setup`` at ``micro_batch`` under ``capacity``'s buffer model."""
    return estimate_memory(
        shape, setup, micro_batch=micro_batch, context_bytes=capacity.context_bytes, buffers=capacity.buffers
    )


def _fits(memory: MemoryEstimate, capacity: Capacity) -> bool:
    return memory.total <= capacity.device_bytes and memory.host_peak_per_node <= capacity.host_bytes


def evaluate(shape: ModelShape, setup: TrainingSetup, capacity: Capacity) -> Evaluation:
    """Evaluate ``setup``: fit at its micro-batch and the largest fitting micro-batch (device and host)."""
    memory = memory_at(shape, setup, capacity, setup.micro_batch)
    largest = largest_fitting(lambda b: _fits(memory_at(shape, setup, capacity, b), capacity))
    return Evaluation(setup, memory, _fits(memory, capacity), largest)


def _variants(base: TrainingSetup, checkpointing: list[bool], offload: bool) -> list[TrainingSetup]:
    """Candidate setups in order of preference (cheapest communication first)."""
    placements = (
        ((2, True, False), (3, True, False), (3, True, True))
        if offload
        else tuple((stage, False, False) for stage in range(4))
    )
    out = []
    for gc in checkpointing:
        for stage, opt, par in placements:
            engine = base.engine if stage == 0 else "deepspeed"
            out.append(
                base.replace(
                    engine=engine,
                    zero_stage=stage,
                    offload_optimizer=opt,
                    offload_param=par,
                    gradient_checkpointing=gc,
                )
            )
    return out


def _attempts(shape: ModelShape, base: TrainingSetup, capacity: Capacity) -> list[tuple[list, bool]]:
    """Ordered ``(candidates, allow_smaller_micro_batch)`` groups to try."""
    user_gc = base.gradient_checkpointing
    plain = _variants(base, [user_gc], offload=False)
    checkpointed = [] if user_gc else _variants(base, [True], offload=False)
    offloaded = _variants(base, [user_gc, True] if not user_gc else [True], offload=True)
    stage3 = memory_at(shape, plain[-1], capacity, base.micro_batch)
    if stage3.activations >= 0.5 * stage3.total:  # activations dominate: checkpoint before shrinking
        order = [(plain, False), (checkpointed, False), (plain, True), (checkpointed, True)]
    else:
        order = [(plain, False), (plain, True), (checkpointed, False), (checkpointed, True)]
    return [*order, (offloaded, False), (offloaded, True)]


def _choose(shape: ModelShape, base: TrainingSetup, capacity: Capacity) -> Evaluation | None:
    for candidates, smaller_ok in _attempts(shape, base, capacity):
        for setup in candidates:
            ev = evaluate(shape, setup, capacity)
            if ev.fits:
                return ev
            if smaller_ok and ev.max_micro_batch >= 1:
                samples = base.micro_batch * base.grad_accum
                micro = ev.max_micro_batch
                return evaluate(
                    shape, setup.replace(micro_batch=micro, grad_accum=math.ceil(samples / micro)), capacity
                )
    return None


def min_gpus(shape: ModelShape, base: TrainingSetup, capacity: Capacity, max_nodes: int = 1024) -> int | None:
    """Fewest GPUs (whole nodes) on which ZeRO-3 with gradient checkpointing fits at micro-batch 1."""
    setup = base.replace(engine="deepspeed", zero_stage=3, gradient_checkpointing=True, micro_batch=1)
    for nodes in range(1, max_nodes + 1):
        candidate = setup.replace(nodes=nodes)
        if _fits(memory_at(shape, candidate, capacity, 1), capacity):
            return candidate.world_size
    return None


_KEYS = {
    "engine": "run.engine",
    "zero_stage": "deepspeed.zero_stage",
    "offload_optimizer": "deepspeed.offload_optimizer",
    "offload_param": "deepspeed.offload_param",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "peft_method": "peft.method",
    "micro_batch": "train.batch_size",
    "grad_accum": "train.grad_accum",
}


def _describe(ev: Evaluation, capacity: Capacity) -> str:
    s = ev.setup
    where = f"ZeRO-{s.stage}" if s.engine == "deepspeed" else "torch engine"
    offload = (
        " with optimizer and parameter offload"
        if s.offload_param
        else (" with optimizer offload" if s.offload_optimizer else " without offload")
    )
    extras = (", gradient checkpointing" if s.gradient_checkpointing else "") + (
        f", {s.peft_method}" if s.peft_method != "none" else ", full fine-tuning"
    )
    used = ev.memory.total / GiB
    return (
        f"{where}{offload}{extras}: micro-batch {s.micro_batch} x accumulation {s.grad_accum} uses "
        f"{used:.1f} of {capacity.device_bytes / GiB:.1f} GiB per GPU "
        f"(largest micro-batch {ev.max_micro_batch})"
    )


def recommend(shape: ModelShape, base: TrainingSetup, capacity: Capacity) -> dict[str, Any]:
    """Recommend a setup that fits, trying the cheapest changes first.

    Order: the lowest ZeRO stage without offload, then gradient checkpointing, then a smaller micro-batch
    (same global batch), then offload, then LoRA instead of full fine-tuning.
    """
    notes: list[str] = []
    chosen = _choose(shape, base, capacity)
    if chosen is None and base.full_finetune:
        try:
            chosen = _choose(shape, base.replace(peft_method="lora"), capacity)
        except ConfigError as exc:
            notes.append(f"LoRA not considered: {exc}")
    if chosen is None:
        gpus = min_gpus(shape, base, capacity)
        hint = (
            f"at least {gpus} GPUs (ZeRO-3, gradient checkpointing, micro-batch 1)" if gpus else "bigger GPUs"
        )
        return {
            "status": "does_not_fit",
            "summary": f"no setup fits on {base.world_size} GPU(s); needs {hint}",
            "overrides": {},
            "min_gpus": gpus,
            "notes": notes,
        }
    rec = chosen.setup
    overrides = {_KEYS[k]: getattr(rec, k) for k in _KEYS if getattr(rec, k) != getattr(base, k)}
    if base.engine == "torch" and rec.engine == "torch" and "deepspeed.zero_stage" in overrides:
        overrides.pop("deepspeed.zero_stage")
    act_share = chosen.memory.activations / max(chosen.memory.total, 1)
    if (
        act_share >= 0.5
        and chosen.memory.total > capacity.device_bytes / 2
        and not rec.gradient_checkpointing
    ):
        notes.append(f"activations are {act_share:.0%} of GPU memory; gradient checkpointing would free most")
    return {
        "status": "changed" if overrides else "as_configured",
        "summary": _describe(chosen, capacity),
        "overrides": overrides,
        "engine": rec.engine,
        "zero_stage": rec.stage,
        "offload_optimizer": rec.offload_optimizer,
        "offload_param": rec.offload_param,
        "gradient_checkpointing": rec.gradient_checkpointing,
        "peft_method": rec.peft_method,
        "micro_batch": rec.micro_batch,
        "grad_accum": rec.grad_accum,
        "max_micro_batch": chosen.max_micro_batch,
        "per_gpu_total": chosen.memory.total,
        "notes": notes,
    }
