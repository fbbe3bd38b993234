"""Accelerator table (peak dense FLOPs) and the FLOPs-per-token model behind the tokens/s prediction."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from distributed_ft.errors import ConfigError
from distributed_ft.planning.models import ModelShape

GiB = 1024**3
TERA = 1e12


@dataclass(frozen=True)
class DeviceSpec:
    """Peak dense (no sparsity) FLOP/s per dtype, nominal memory and the per-process context we assume."""

    name: str
    memory_gib: float
    peak_bf16: float | None
    peak_fp16: float | None
    peak_fp32: float
    default_mfu: float = 0.4
    context_bytes: int = GiB
    source: str = ""

    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s for ``bf16``, ``fp16`` or ``fp32`` compute.

        Raises:
            ConfigError: when the device has no fast path for ``dtype`` (bf16 before Ampere).
        """
        peak = {"bf16": self.peak_bf16, "fp16": self.peak_fp16, "fp32": self.peak_fp32}[dtype]
        if peak is None:
            raise ConfigError(f"{self.name} has no {dtype} tensor cores; use fp16 mixed precision or fp32")
        return peak


_NV = "NVIDIA datasheet"
DEVICES: dict[str, DeviceSpec] = {
    d.name: d
    for d in (
        DeviceSpec("A100-40GB", 40, 312 * TERA, 312 * TERA, 19.5 * TERA, source=f"{_NV}, A100 SXM"),
        DeviceSpec("A100-80GB", 80, 312 * TERA, 312 * TERA, 19.5 * TERA, source=f"{_NV}, A100 SXM"),
        DeviceSpec("H100-80GB", 80, 989.4 * TERA, 989.4 * TERA, 67 * TERA, source=f"{_NV}, H100 SXM"),
        DeviceSpec("H100-PCIe", 80, 756 * TERA, 756 * TERA, 51 * TERA, source=f"{_NV}, H100 PCIe"),
        DeviceSpec("H200", 141, 989.4 * TERA, 989.4 * TERA, 67 * TERA, source=f"{_NV}, H200 SXM"),
        DeviceSpec("L4", 24, 121 * TERA, 121 * TERA, 30.3 * TERA, source=f"{_NV}, L4"),
        DeviceSpec(
            "A10G", 24, 125 * TERA, 125 * TERA, 31.2 * TERA, source=f"{_NV}, A10 (A10G assumed equal)"
        ),
        DeviceSpec("V100", 32, None, 125 * TERA, 15.7 * TERA, source=f"{_NV}, V100 SXM2"),
        DeviceSpec("T4", 16, None, 65 * TERA, 8.1 * TERA, source=f"{_NV}, T4"),
        DeviceSpec(
            "CPU",
            0,
            1 * TERA,
            None,
            1 * TERA,
            default_mfu=0.3,
            context_bytes=GiB // 2,
            source="nominal placeholder; pass a measured tokens/s",
        ),
    )
}

_ALIASES: dict[str, str] = {
    "A10040GB": "A100-40GB",
    "A10040": "A100-40GB",
    "A100": "A100-80GB",
    "H100PCIE": "H100-PCIe",
    "H100": "H100-80GB",
    "H200": "H200",
    "L4": "L4",
    "A10G": "A10G",
    "A10": "A10G",
    "V100": "V100",
    "T4": "T4",
    "CPU": "CPU",
}


def device_spec(gpu_type: str) -> DeviceSpec:
    """Look up ``cluster.gpu_type`` (case, dashes and an ``NVIDIA``/``Tesla`` prefix are ignored).

    Raises:
        ConfigError: for an unknown device.
    """
    canon = re.sub(r"[^A-Z0-9]", "", gpu_type.upper())
    canon = re.sub(r"^(NVIDIA|TESLA)+", "", canon)
    hits = [alias for alias in _ALIASES if canon.startswith(alias)]
    if not hits:
        raise ConfigError(f"unknown cluster.gpu_type {gpu_type!r}; known: {', '.join(DEVICES)}")
    name = _ALIASES[max(hits, key=len)]
    if name == "A100-80GB" and "40GB" in canon:
        name = "A100-40GB"
    if name == "H100-80GB" and "PCIE" in canon:
        name = "H100-PCIe"
    return DEVICES[name]


def flops_per_token(
    shape: ModelShape,
    seq_len: int,
    *,
    trainable_params: int,
    full_finetune: bool,
    gradient_checkpointing: bool = False,
    adversarial_steps: int = 0,
) -> tuple[float, float]:
    """Training FLOPs per token: ``(model_flops, hardware_flops)``.

    Dense matmuls cost 2 FLOPs per weight per token forward, 4 backward (2 for the input gradient, 2 for the
    weight gradient), so full training is ``6 M`` with ``M = shape.matmul_params``. A frozen base still needs
    input gradients but no weight gradients: ``4 M`` plus ``6 T`` for the trainable parameters ``T``.
    Attention scores and their use on values add ``4 L h s`` forward per token and twice that backward:
    ``12 L h s`` (PaLM, Chowdhery et al. 2022, app. B). Gradient checkpointing re-runs the forward pass
    (``2 M + 4 L h s`` more hardware FLOPs); model FLOPs exclude that recomputation.

    Adversarial training with ``k`` perturbation steps (``train/adversarial.py``; FGM ``k = 1``) runs, per
    micro-batch, ``k`` forwards each followed by an input-gradient backward (``2 M + 4 L h s`` each way),
    then the adversarial forward, and one backward through both graphs: ``k (4 M + 8 L h s)`` plus one more
    backward (``weights - 2 M + 8 L h s``) on top of the plain step. They are the method's own work, so they
    count in both model and hardware FLOPs (FGM on a full fine-tune: ``14 M`` instead of ``6 M``).
    """
    matmul = float(shape.matmul_params)
    attention_fwd = 4.0 * shape.num_layers * shape.hidden_size * seq_len
    weights = 6.0 * matmul if full_finetune else 4.0 * matmul + 6.0 * trainable_params
    model = weights + 3.0 * attention_fwd
    if adversarial_steps:
        forward_and_input_gradient = 2.0 * (2.0 * matmul + attention_fwd)
        backward = weights - 2.0 * matmul + 2.0 * attention_fwd
        model += adversarial_steps * forward_and_input_gradient + backward
    hardware = model + (2.0 * matmul + attention_fwd if gradient_checkpointing else 0.0)
    return model, hardware


def predict_throughput(
    model_flops: float,
    hardware_flops: float,
    peak_flops: float,
    world_size: int,
    *,
    utilization: float,
    measured_tokens_per_s: float | None = None,
) -> dict[str, Any]:
    """Job-wide tokens/s from FLOPs (or a measurement) and the model-FLOPs utilization it implies.

    Args:
        model_flops: Model FLOPs per token (no recomputation).
        hardware_flops: FLOPs actually executed per token.
        peak_flops: Peak FLOP/s of one device in the compute dtype.
        world_size: Devices in the job.
        utilization: Assumed fraction of peak achieved on executed FLOPs (the MFU when nothing is
            recomputed).
        measured_tokens_per_s: A measured job-wide rate; overrides the prediction.
    """
    if not 0 < utilization <= 1:
        raise ConfigError(f"mfu must be in (0, 1], got {utilization}")
    if measured_tokens_per_s is not None:
        if measured_tokens_per_s <= 0:
            raise ConfigError(f"measured tokens/s must be positive, got {measured_tokens_per_s}")
        tokens_per_s, source = float(measured_tokens_per_s), "measured"
    else:
        tokens_per_s, source = utilization * peak_flops * world_size / hardware_flops, "flops"
    return {
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * model_flops / (peak_flops * world_size),
        "source": source,
        "assumed_utilization": utilization if source == "flops" else None,
        "model_flops_per_token": model_flops,
        "hardware_flops_per_token": hardware_flops,
        "peak_flops_per_gpu": peak_flops,
    }
