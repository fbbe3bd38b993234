"""The planner's result: a dataclass with the ``dft plan --json`` object and a human-readable table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GiB = 1024**3
_PER_GPU_KEYS = ("parameters", "gradients", "optimizer_states", "activations", "buffers", "total")


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


@dataclass
class PlanReport:
    """Everything ``dft plan`` prints.

    ``memory["per_gpu"]`` holds bytes for ``parameters``, ``gradients``, ``optimizer_states``,
    ``activations``, ``buffers`` and ``total``; ``memory["host"]`` holds the host-RAM need.
    """

    model: dict[str, Any]
    setup: dict[str, Any]
    memory: dict[str, Any]
    fits: bool
    max_micro_batch: int
    throughput: dict[str, Any]
    time: dict[str, Any]
    recommendation: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The user-contract JSON object (plain types only); notes go under ``recommendation``."""
        recommendation = dict(self.recommendation)
        recommendation["notes"] = [*self.notes, *recommendation.get("notes", [])]
        return {
            "model": dict(self.model),
            "setup": dict(self.setup),
            "memory": {"per_gpu": dict(self.memory["per_gpu"]), "host": dict(self.memory["host"])},
            "fits": bool(self.fits),
            "max_micro_batch": int(self.max_micro_batch),
            "throughput": dict(self.throughput),
            "time": dict(self.time),
            "recommendation": recommendation,
        }

    def format_table(self) -> str:
        """A plain-text report for the terminal."""
        m, s, per_gpu, host = self.model, self.setup, self.memory["per_gpu"], self.memory["host"]
        capacity = s["gpu_memory_bytes"]
        placement = f"ZeRO-{s['effective_zero_stage']}" if s["engine"] == "deepspeed" else "(no ZeRO)"
        offload = [k for k in ("offload_optimizer", "offload_param") if s[k]]
        lines = [
            f"Model      {m['name']} ({m['model_type']}): {_count(m['total_params'])} parameters, "
            f"{_count(s['trainable_params'])} trainable ({s['peft_method']})",
            f"Job        {s['task']}, seq {s['seq_len']}, micro-batch {s['micro_batch']} x accum "
            f"{s['grad_accum']} x {s['world_size']} GPU(s) = {s['global_batch']} sequences/step",
            f"Setup      {s['engine']} {placement}, {s['precision']} states, {s['compute_dtype']} compute, "
            f"offload: {', '.join(offload) or 'none'}, gradient checkpointing: "
            f"{'on' if s['gradient_checkpointing'] else 'off'}",
            "",
            f"Memory per GPU ({s['gpu_type']}, {_gib(capacity)})",
        ]
        for key in _PER_GPU_KEYS:
            share = per_gpu[key] / capacity if capacity else 0.0
            lines.append(f"  {key:<18}{_gib(per_gpu[key]):>14}  {share:>7.1%}")
        lines += [
            f"  fits: {'yes' if self.fits else 'NO'}; largest micro-batch that fits: {self.max_micro_batch}",
            f"Host RAM per node: {_gib(host['per_node'])} of {_gib(host['available_per_node'])} "
            f"({'ok' if host['fits'] else 'TOO MUCH'}); loading the model may peak at "
            f"{_gib(host['model_load_per_node'])}",
            "",
        ]
        t = self.throughput
        lines.append(
            f"Throughput {t['tokens_per_s']:,.0f} tokens/s ({t['source']}), MFU {t['mfu']:.1%}, "
            f"{t['model_flops_per_token'] / 1e9:,.2f} GFLOPs/token"
        )
        tm = self.time
        if tm.get("seconds") is not None:
            lines.append(
                f"Time       {_duration(tm['seconds'])} for {_count(tm['tokens'])} tokens "
                f"({tm['optimizer_steps']:,} steps): {tm['gpu_hours']:,.1f} GPU-hours, cost {tm['cost']:,.2f}"
            )
        else:
            lines.append("Time       unknown (give the number of training tokens)")
        rec = self.recommendation
        lines += ["", f"Recommendation ({rec['status']}): {rec['summary']}"]
        if rec.get("overrides"):
            lines.append("  " + " ".join(f"{k}={_value(v)}" for k, v in rec["overrides"].items()))
        notes = [*self.notes, *rec.get("notes", [])]
        lines += [f"Note: {note}" for note in notes]
        return "\n".join(lines)


def _value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)
