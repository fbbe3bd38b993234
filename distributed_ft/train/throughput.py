"""Honest throughput: model FLOPs per token of the trainable set, the device's peak, MFU, peak memory.

Tokens and samples are counted on every rank and summed in the loop's one reduction per log window
(:class:`~distributed_ft.train.step.StepTally`), so tokens/s is the job's, not rank 0's times the world size.
MFU is ``tokens/s x model FLOPs per token / (peak FLOP/s per rank x ranks)``:

* FLOPs per token come from the planner's model (:func:`distributed_ft.planning.flops_per_token`): ``6 M``
  for full fine-tuning, ``4 M + 6 T`` when only ``T`` parameters train (LoRA, a frozen base), plus the
  attention term at the window's mean sequence length, plus the passes of adversarial training; recomputation
  (gradient checkpointing) is excluded.
* The peak is the planner's dense table for the GPU in the compute dtype (bf16/fp16 with mixed precision
  or half weights, else fp32), or on a CPU a one-thread fp32 matmul probe times this rank's threads.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from dataclasses import dataclass

import torch

from distributed_ft.config.schema import JobConfig
from distributed_ft.planning import ModelShape, device_spec, flops_per_token, shape_from_pretrained
from distributed_ft.planning.spec import adversarial_steps

log = logging.getLogger("distributed_ft")


@dataclass(frozen=True)
class FlopsMeter:
    """MFU of a window from its global tokens/s and mean sequence length."""

    shape: ModelShape
    trainable_params: int
    full_finetune: bool
    peak_flops_per_rank: float
    peak_source: str
    world_size: int
    adversarial_steps: int = 0

    def flops_per_token(self, seq_len: float) -> float:
        """Model FLOPs (forward + backward) per token at ``seq_len`` tokens per example."""
        flops, _ = flops_per_token(
            self.shape,
            max(round(seq_len), 1),
            trainable_params=self.trainable_params,
            full_finetune=self.full_finetune,
            adversarial_steps=self.adversarial_steps,
        )
        return flops

    def mfu(self, tokens_per_s: float, seq_len: float) -> float:
        """Model FLOPs utilisation of the job (all ranks) at that throughput."""
        peak = self.peak_flops_per_rank * self.world_size
        return tokens_per_s * self.flops_per_token(seq_len) / peak


def compute_dtype(config: JobConfig) -> str:
    """``bf16``, ``fp16`` or ``fp32``: the dtype the matmuls run in (what the device's peak is taken for)."""
    if config.train.mixed_precision != "no":
        return config.train.mixed_precision
    return {"bfloat16": "bf16", "float16": "fp16"}.get(config.model.dtype, "fp32")


def matmul_peak_flops(size: int = 1024, seconds: float = 0.4, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of ``size x size`` matmuls on the CPU with this process's current threads.

    The operands come from a generator of their own: the job's seeded random streams stay untouched.
    """
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.rand(size, size, generator=generator, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - started))
    return best


def device_peak(device: torch.device, dtype: str, probe_seconds: float = 0.2) -> tuple[float, str]:
    """Peak dense FLOP/s of one rank's device in ``dtype`` and where the figure comes from.

    Raises:
        ConfigError: a GPU the planner's table does not know (the caller logs MFU as unknown).
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        spec = device_spec(name)
        return spec.peak_flops(dtype), f"{spec.name} datasheet, dense {dtype}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: a probe with all of them on a busy machine measures the others
    try:
        per_thread = matmul_peak_flops(seconds=probe_seconds)
    finally:
        torch.set_num_threads(threads)
    source = f"CPU fp32 matmul probe, {per_thread / 1e9:.1f} GFLOP/s per thread x {threads} threads"
    return per_thread * threads, source


def flops_meter(config: JobConfig, num_labels: int | None, trainable: int, device: torch.device, world: int):
    """The job's :class:`FlopsMeter`, or ``None`` (one log line why) when the model or device is unknown."""
    try:
        shape = shape_from_pretrained(
            config.model.name, config.task, num_labels=num_labels, revision=config.model.revision
        )
        peak, source = device_peak(device, compute_dtype(config))
    except Exception as exc:  # MFU is a report, never a reason to stop training
        log.info("MFU not reported: %s", exc)
        return None
    full = config.peft.method == "none"
    return FlopsMeter(shape, trainable, full, peak, source, world, adversarial_steps(config.train))


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: the CUDA allocator's peak on a GPU, else the peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
