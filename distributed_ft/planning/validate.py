"""The plan vs a measured job: predicted and measured memory per rank, and the report of the two.

``dft plan --validate`` measures a short real job (``train/measure.py``: a few optimizer steps on
synthetic full-length batches, ``train.batch_size`` x ``data.max_length``, the shape the planner assumes)
and hands the per-rank :class:`Measurement` s here, where :func:`compare` sets them beside the plan:

* **parameters, gradients, optimizer states**: counted from the tensors right before the optimizer step
  of a step after the first (gradients are alive and AdamW's moments exist), the peak the planner models;
* **activations**: the bytes of the tensors autograd saves for the backward pass during one forward pass
  and loss (each storage once, parameters left out), the quantity the planner's activation model counts;
* process RSS (current and peak) and, on CUDA, the peak reserved memory, for context: they include
  buffers, the allocator's cache and the Python process, which the component rows do not.

Offloaded states are compared as device + host bytes (on a CPU-only machine both are the same RAM).
Only the standard library and the planner are imported here.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distributed_ft.config.schema import JobConfig
from distributed_ft.planning.memory import BufferModel, state_bytes_per_rank
from distributed_ft.planning.planner import plan_job

MiB = 1024**2
STATE_COMPONENTS = ("parameters", "gradients", "optimizer_states")
COMPONENTS = (*STATE_COMPONENTS, "activations")
Reference = Callable[[Any, JobConfig, int], dict[str, Any]]
"""``(model before prepare, config, world size) -> {"name", "model_states" (bytes per rank), "note"}``."""


@dataclass
class Measurement:
    """What one rank held and how long its steps took."""

    rank: int
    state_bytes: dict[str, int]
    """Parameters, gradients and optimizer states before the optimizer step (the peak)."""
    state_bytes_after_step: dict[str, int]
    activations: int
    rss_bytes: int
    peak_rss_bytes: int
    step_seconds: list[float]
    device_peak_reserved: int | None = None
    """``torch.cuda.max_memory_reserved`` on CUDA; ``None`` on CPU."""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def plan_config(config: JobConfig, world_size: int, device_type: str) -> JobConfig:
    """The config the planner sees: one node of ``world_size`` devices (``CPU`` when running on CPU)."""
    cluster = {"gpus_per_node": world_size, "nodes": 1}
    if device_type == "cpu":
        cluster["gpu_type"] = "CPU"
    return config.model_copy(update={"cluster": config.cluster.model_copy(update=cluster)})


def buffer_model(ds_config: dict[str, Any] | None) -> BufferModel:
    """The planner's buffer model with the ZeRO settings the engine actually rendered."""
    zero = (ds_config or {}).get("zero_optimization", {})
    values = {
        "persistence_threshold": zero.get("stage3_param_persistence_threshold"),
        "reduce_bucket_elements": zero.get("reduce_bucket_size"),
        "prefetch_bucket_elements": zero.get("stage3_prefetch_bucket_size"),
        "overlap_comm": zero.get("overlap_comm"),
    }
    return BufferModel(**{k: type(getattr(BufferModel(), k))(v) for k, v in values.items() if v is not None})


def predict(config: JobConfig, world_size: int, device_type: str, num_labels: int | None, **kwargs: Any):
    """``(per-rank bytes per component at the measurement point, the PlanReport)``.

    Offloaded states count device + host. The plan's gradients are the peak; for ZeRO-1 that is the full
    gradients held during the backward pass, which are reduced to this rank's partition by the time the
    optimizer step starts (where they are measured), so the comparison uses the planner's
    after-reduction figure (``state_bytes_per_rank(..., grads_after_reduction=True)``) and keeps the peak
    in ``peak_gradients``.
    """
    report = plan_job(plan_config(config, world_size, device_type), num_labels=num_labels, **kwargs)
    per_gpu, host = report.memory["per_gpu"], report.memory["host"]["per_rank"]
    predicted = {key: int(per_gpu[key]) + int(host.get(key, 0)) for key in STATE_COMPONENTS}
    predicted["activations"] = int(per_gpu["activations"])
    setup = report.setup
    if setup["effective_zero_stage"] == 1 and not setup["offload_optimizer"]:
        reduced = state_bytes_per_rank(
            setup["stored_params"],
            setup["trainable_params"],
            world_size,
            1,
            setup["precision"],
            grads_after_reduction=True,
        )
        predicted["peak_gradients"] = predicted["gradients"]
        predicted["gradients"] = reduced["gradients"]
    return predicted, report


def relative_error(predicted: float, measured: float) -> float | None:
    """``(predicted - measured) / measured``; ``None`` when nothing was measured."""
    return None if not measured else (predicted - measured) / measured


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MiB:,.2f} MiB"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


@dataclass
class ValidationReport:
    """Predicted vs measured memory of one job, per rank (rank 0 shown, every rank kept)."""

    setup: dict[str, Any]
    predicted: dict[str, int]
    ranks: list[Measurement]
    reference: dict[str, Any] | None = None
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def measured(self) -> dict[str, int]:
        """Rank 0's bytes per component."""
        rank0 = self.ranks[0]
        return {**rank0.state_bytes, "activations": rank0.activations}

    def errors(self) -> dict[str, float | None]:
        """Relative error of the prediction per component, for every rank (the worst one wins)."""
        out: dict[str, float | None] = {}
        for key in (*COMPONENTS, "model_states"):
            worst = None
            for rank in self.ranks:
                measured = {**rank.state_bytes, "activations": rank.activations}
                value = sum(measured[k] for k in STATE_COMPONENTS) if key == "model_states" else measured[key]
                predicted = self.predicted_states if key == "model_states" else self.predicted[key]
                error = relative_error(predicted, value)
                if error is not None and (worst is None or abs(error) > abs(worst)):
                    worst = error
            out[key] = worst
        return out

    @property
    def predicted_states(self) -> int:
        return sum(self.predicted[k] for k in STATE_COMPONENTS)

    def reference_error(self) -> float | None:
        """Relative error of the reference estimator's model states vs rank 0's measured model states."""
        if not self.reference or self.reference.get("model_states") is None:
            return None
        measured = sum(self.measured[k] for k in STATE_COMPONENTS)
        return relative_error(self.reference["model_states"], measured)

    def step_seconds_p50(self) -> float | None:
        """Median step time on rank 0 without the first two steps (state creation, metering)."""
        timed = self.ranks[0].step_seconds[2:]
        return statistics.median(timed) if timed else None

    def to_json(self) -> dict[str, Any]:
        return {
            "setup": self.setup,
            "predicted": self.predicted,
            "measured": self.measured,
            "errors": self.errors(),
            "reference": self.reference,
            "reference_error": self.reference_error(),
            "step_seconds_p50": self.step_seconds_p50(),
            "ranks": [r.to_json() for r in self.ranks],
            "plan": self.plan,
        }

    def format_table(self) -> str:
        """The text report ``dft plan --validate`` prints."""
        s = self.setup
        errors = self.errors()
        lines = [
            f"Plan vs measured: {s['engine']} {s['placement']}, {s['peft']}, {s['world_size']} rank(s) on "
            f"{s['device']}, micro-batch {s['micro_batch']} x {s['seq_len']} tokens, {s['precision']}, "
            f"{s['steps']} steps (rank 0 shown; error = worst rank)",
            f"  {'component':<28}{'predicted':>16}{'measured':>16}{'error':>9}",
        ]
        measured = self.measured
        rows = [(k, self.predicted[k], measured[k], errors[k]) for k in STATE_COMPONENTS]
        rows.append(
            (
                "model states (sum)",
                self.predicted_states,
                sum(measured[k] for k in STATE_COMPONENTS),
                errors["model_states"],
            )
        )
        rows.append(
            (
                "activations (saved tensors)",
                self.predicted["activations"],
                measured["activations"],
                errors["activations"],
            )
        )
        for name, predicted, value, error in rows:
            lines.append(
                f"  {name.replace('_', ' '):<28}{_mib(predicted):>16}{_mib(value):>16}{_pct(error):>9}"
            )
        if "peak_gradients" in self.predicted:
            lines.append(
                f"  (ZeRO-1: gradients compared after their reduction to this rank's partition; planner's "
                f"peak, full gradients during the backward pass, is {_mib(self.predicted['peak_gradients'])})"
            )
        ref = self.reference
        if ref:
            estimate = ref.get("model_states")
            lines.append(
                f"  {'DeepSpeed estimator':<28}{_mib(estimate):>16}"
                f"{_mib(sum(measured[k] for k in STATE_COMPONENTS)):>16}{_pct(self.reference_error()):>9}"
                f"  ({ref.get('name', '')}{'; ' + ref['note'] if ref.get('note') else ''})"
            )
        rank0 = self.ranks[0]
        lines.append(
            f"  process RSS {_mib(rank0.rss_bytes)} (peak {_mib(rank0.peak_rss_bytes)}); it also holds "
            "Python, libraries, buffers and allocator caches"
            + (
                f"; CUDA peak reserved {_mib(rank0.device_peak_reserved)}"
                if rank0.device_peak_reserved is not None
                else ""
            )
        )
        p50 = self.step_seconds_p50()
        if p50 is not None:
            lines.append(f"  step time p50 {p50:.3f} s (steps 3..{len(rank0.step_seconds)})")
        return "\n".join(lines)


def compare(
    config: JobConfig,
    ranks: list[Measurement],
    *,
    device_type: str,
    num_labels: int | None,
    ds_config: dict[str, Any] | None = None,
    reference: dict[str, Any] | None = None,
    steps: int = 3,
) -> ValidationReport:
    """Set every rank's measurement beside the plan of the same job on ``len(ranks)`` devices.

    Args:
        config: The measured job's config.
        ranks: One measurement per rank, in rank order.
        device_type: ``cuda`` or ``cpu``: where the job ran.
        num_labels: The head's labels (``None`` for causal LMs).
        ds_config: The DeepSpeed config the engine rendered (its ZeRO buffer sizes), if any.
        reference: Another estimator's row to show beside the planner (DeepSpeed's).
        steps: The optimizer steps each rank took.
    """
    world_size = len(ranks)
    predicted, plan = predict(config, world_size, device_type, num_labels, buffers=buffer_model(ds_config))
    stage = plan.setup["effective_zero_stage"]
    offload = [k.removeprefix("offload_") for k in ("offload_optimizer", "offload_param") if plan.setup[k]]
    setup = {
        "engine": config.run.engine,
        "placement": f"ZeRO-{stage}" + (f" + offload {'/'.join(offload)}" if offload else ""),
        "zero_stage": stage,
        "offload": offload,
        "peft": config.peft.method if config.peft.method != "none" else "full fine-tuning",
        "trainable_params": plan.setup["trainable_params"],
        "world_size": world_size,
        "device": device_type,
        "micro_batch": config.train.batch_size,
        "seq_len": config.data.max_length,
        "precision": plan.setup["precision"],
        "steps": steps,
        "activations_measured_by": "saved_tensors_hooks (one forward + loss, parameters excluded)",
    }
    return ValidationReport(setup, predicted, ranks, reference, plan.to_json())
