"""Shared measurement helpers: environment record, step statistics, FLOPs/MFU, memory, job configs.

Definitions used by every experiment (also in ``benchmarks/README.md``):

* **step time**: wall time from the end of one optimizer step to the end of the next (so it includes
  fetching and collating the batch); the first ``warmup_steps`` are excluded; p50 and p90 over the rest.
* **samples/s, real tokens/s, padded tokens/s**: sums over the measured steps divided by their summed
  step times. Real tokens are ``attention_mask`` ones (padding excluded); padded tokens are
  ``batch x padded length``.
* **MFU**: ``real tokens/s x model FLOPs per token / peak FLOP/s``. FLOPs per token come from the
  planner's :func:`~distributed_ft.planning.flops_per_token` (``6 M + 12 L h s`` for full fine-tuning,
  ``4 M + 6 T + 12 L h s`` with a frozen base) at the mean padded sequence length. Peak FLOP/s: the
  planner's device table on a known GPU; on CPU a measured fp32 matmul probe (the best of a few
  ``n x n`` matmuls with the process's threads), i.e. MFU on CPU is relative to what a matmul achieves.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from distributed_ft.testing import tensor_bytes

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SMOKE_RESULTS = RESULTS / "tmp"
TINY_BERT = "bench:tiny-bert"
"""A placeholder ``model.name``: a random 2-layer, 64-wide BERT with MiniLM's tokenizer (smoke runs)."""
PACKAGES = (
    "torch",
    "transformers",
    "deepspeed",
    "peft",
    "ray",
    "accelerate",
    "pyarrow",
    "numpy",
    "matplotlib",
)


# --------------------------------------------------------------------------- environment
def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def package_versions() -> dict[str, str | None]:
    """Installed versions of the stack (``None``: not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment() -> dict[str, Any]:
    """Date, hardware, software versions, git commit and machine load: what a result was measured on."""
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
        threads = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        threads = None
    status = _git("status", "--porcelain")
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hardware": {
            "cpu": _cpu_model(),
            "logical_cpus": os.cpu_count(),
            "memory_gib": _memory_gib(),
            "gpu": gpu,
            "torch_threads": threads,
        },
        "software": package_versions(),
        "git": {"commit": _git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None},
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def hardware_line(env: dict[str, Any]) -> str:
    """``2 x AMD EPYC, 23 GiB, no GPU`` for tables."""
    hw = env["hardware"]
    gpu = f"{hw['gpu']['count']} x {hw['gpu']['name']}" if hw.get("gpu") else "no GPU"
    return f"{hw['logical_cpus']} x {hw['cpu']}, {hw['memory_gib']} GiB, {gpu}"


# --------------------------------------------------------------------------- statistics
def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-quantile (0-1) with linear interpolation; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def step_summary(
    durations: list[float],
    samples: list[int],
    real_tokens: list[int],
    padded_tokens: list[int],
    warmup: int,
) -> dict[str, Any]:
    """p50/p90 step time and rates over the steps after ``warmup`` (per-step lists, equal length)."""
    keep = slice(min(warmup, max(len(durations) - 1, 0)), None)
    d, s, r, p = durations[keep], samples[keep], real_tokens[keep], padded_tokens[keep]
    seconds = sum(d)

    def rate(n: int) -> float | None:
        return n / seconds if seconds > 0 else None

    return {
        "steps_total": len(durations),
        "steps_measured": len(d),
        "warmup_steps": keep.start,
        "step_s_p50": percentile(d, 0.5),
        "step_s_p90": percentile(d, 0.9),
        "samples_per_s": rate(sum(s)),
        "real_tokens_per_s": rate(sum(r)),
        "padded_tokens_per_s": rate(sum(p)),
        "real_token_fraction": sum(r) / sum(p) if sum(p) else None,
        "mean_padded_len": (sum(p) / sum(s)) if sum(s) else None,
        "measured_seconds": seconds,
        "all_steps_seconds": sum(durations),
    }


class StepRecorder:
    """Per-step wall-clock marks and batch sizes, fed by whichever loop is being measured.

    ``batch()`` is called with each training batch, ``step_done()`` after each optimizer step. Step ``i``
    lasts from the end of step ``i - 1`` (for the first step: the first batch) to the end of step ``i``.
    ``compute()`` times the model work (forward, backward, clipping and optimizer step) inside a step; the
    rest of the step is the loop's own overhead (fetching and collating the batch, bookkeeping).
    """

    def __init__(self, batches_per_step: int = 1, state_bytes_at: int = 3) -> None:
        self.batches_per_step = batches_per_step
        self.state_bytes_at = state_bytes_at
        self.start: float | None = None
        self.ends: list[float] = []
        self.samples: list[int] = []
        self.real: list[int] = []
        self.padded: list[int] = []
        self.state_bytes: dict[str, int] | None = None
        self.computed: list[float] = []
        self._compute = 0.0

    def compute(self, seconds: float) -> None:
        """Add ``seconds`` of model work to the current step."""
        self._compute += seconds

    def batch(self, batch: dict[str, Any]) -> None:
        if self.start is None:
            self.start = time.perf_counter()
        mask = batch["attention_mask"]
        self.samples.append(int(mask.shape[0]))
        self.real.append(int(mask.sum()))
        self.padded.append(int(mask.numel()))

    def step_done(self) -> None:
        self.ends.append(time.perf_counter())
        self.computed.append(self._compute)
        self._compute = 0.0

    def wants_state_bytes(self) -> bool:
        """True right before the optimizer step at which model states are counted (moments exist)."""
        return self.state_bytes is None and len(self.ends) == self.state_bytes_at

    def per_step(self, values: list[int]) -> list[int]:
        n = self.batches_per_step
        return [sum(values[i * n : (i + 1) * n]) for i in range(len(self.ends))]

    def summary(self, warmup: int) -> dict[str, Any]:
        marks = [self.start or 0.0, *self.ends]
        durations = [b - a for a, b in itertools.pairwise(marks)]
        summary = step_summary(
            durations,
            self.per_step(self.samples),
            self.per_step(self.real),
            self.per_step(self.padded),
            warmup,
        )
        if any(self.computed):
            keep = slice(summary["warmup_steps"], None)
            overhead = [d - c for d, c in zip(durations[keep], self.computed[keep], strict=True)]
            summary.update(
                compute_s_p50=percentile(self.computed[keep], 0.5),
                overhead_s_p50=percentile(overhead, 0.5),
                overhead_s_mean=sum(overhead) / len(overhead) if overhead else None,
                overhead_share=sum(overhead) / summary["measured_seconds"]
                if summary["measured_seconds"]
                else None,
            )
        return summary


class TimedEngine:
    """Wraps a library engine to record step boundaries and batch sizes; everything else is delegated.

    The training step itself stays the library's (``forward``, ``backward``, ``step`` of the real engine).
    """

    def __init__(self, inner: Any, recorder: StepRecorder) -> None:
        self._inner, self._recorder, self._training = inner, recorder, True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def train(self, mode: bool = True) -> None:
        self._training = mode
        self._inner.train(mode)

    def forward(self, batch: dict[str, Any], sync_grads: bool = True, bare: bool = False) -> Any:
        if not self._training:
            return self._inner.forward(batch, sync_grads=sync_grads, bare=bare)
        if not bare:  # a bare forward (adversarial training) re-reads a batch the step already counted
            self._recorder.batch(batch)
        started = time.perf_counter()
        outputs = self._inner.forward(batch, sync_grads=sync_grads, bare=bare)
        self._recorder.compute(time.perf_counter() - started)
        return outputs

    def backward(self, loss: Any) -> None:
        started = time.perf_counter()
        self._inner.backward(loss)
        self._recorder.compute(time.perf_counter() - started)

    def step(self) -> float | None:
        if self._recorder.wants_state_bytes():
            self._recorder.state_bytes = self._inner.state_bytes()
        started = time.perf_counter()
        norm = self._inner.step()
        self._recorder.compute(time.perf_counter() - started)
        self._recorder.step_done()
        return norm


# --------------------------------------------------------------------------- memory
def model_state_bytes(model: Any, optimizer: Any) -> dict[str, int]:
    """Parameters, gradients and optimizer states of a plain torch model + optimizer (from the tensors)."""
    params = list(model.parameters())
    states = [t for s in optimizer.state.values() for t in s.values() if hasattr(t, "ndim") and t.ndim > 0]
    return {
        "parameters": tensor_bytes(params),
        "gradients": tensor_bytes(p.grad for p in params),
        "optimizer_states": tensor_bytes(states),
    }


def memory_snapshot() -> dict[str, Any]:
    """Process RSS now and at its peak; CUDA peak reserved when a GPU is used."""
    from distributed_ft.train.measure import peak_rss_bytes, rss_bytes

    out: dict[str, Any] = {"rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes()}
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    except ImportError:  # pragma: no cover
        pass
    return out


# --------------------------------------------------------------------------- FLOPs
def peak_flops(dtype: str = "fp32") -> dict[str, Any]:
    """Peak FLOP/s per unit of compute: per GPU from the planner's table, per CPU thread from a probe.

    On CPU the probe runs with one thread (a multi-threaded probe on a shared, busy machine mostly measures
    the other tenants); MFU then divides by this figure times the threads the run used (``unit``).
    """
    import torch

    note = ""
    if torch.cuda.is_available():
        from distributed_ft.planning import device_spec

        name = torch.cuda.get_device_name(0)
        try:
            spec = device_spec(name)
            return {"flops": spec.peak_flops(dtype), "unit": "gpu", "source": f"planner table: {spec.name}"}
        except Exception as exc:  # an unknown GPU: fall back to the probe
            note = f"; {name} is not in the planner's table ({exc})"
    from distributed_ft.train.throughput import matmul_peak_flops

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        probe = matmul_peak_flops(dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    source = f"measured fp32 matmul probe, {probe / 1e9:,.1f} GFLOP/s per thread"
    return {"flops": probe, "unit": "thread", "source": source + note}


def compute_units(peak: dict[str, Any], workers: int, threads: int) -> int:
    """How many of ``peak``'s units a run used: GPUs (one per worker) or CPU threads."""
    return workers * (threads if peak.get("unit") == "thread" else 1)


def model_flops_per_token(
    model_name: str,
    task: str,
    num_labels: int | None,
    seq_len: float,
    peft_method: str = "none",
    **setup: Any,
) -> float:
    """Model FLOPs per token from the planner (see the module docstring)."""
    from distributed_ft.planning import TrainingSetup, flops_per_token, shape_from_pretrained

    shape = shape_from_pretrained(resolve_model_name(model_name), task, num_labels=num_labels)
    training = TrainingSetup(task=task, peft_method=peft_method, **setup)
    flops, _ = flops_per_token(
        shape,
        max(round(seq_len), 1),
        trainable_params=training.trainable_params(shape),
        full_finetune=training.full_finetune,
    )
    return flops


def mfu(
    real_tokens_per_s: float | None, flops_per_token: float, peak: float, devices: int = 1
) -> float | None:
    if not real_tokens_per_s or not peak:
        return None
    return real_tokens_per_s * flops_per_token / (peak * devices)


# --------------------------------------------------------------------------- models and configs
def tiny_bert_dir() -> Path:
    """A random 2-layer, 64-wide BERT saved with MiniLM's tokenizer (built once, cached)."""
    from distributed_ft.data.builtin import cache_root

    target = cache_root() / "models" / "bench-tiny-bert-h64-l2"
    if (target / "config.json").is_file():
        return target
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    from distributed_ft.data.builtin import resolve
    from distributed_ft.testing import make_tiny_bert

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve("builtin:minilm-l6"))
        make_tiny_bert(staging, tokenizer=tokenizer, max_position_embeddings=512)
        try:
            os.replace(staging, target)  # atomic; a concurrent builder that won first is kept
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_name(name: str) -> str:
    """``bench:tiny-bert`` becomes its directory; other names are left as they are."""
    return str(tiny_bert_dir()) if name == TINY_BERT else name


def overrides_list(job: dict[str, Any]) -> list[str]:
    """``{"train.lr": 1e-4, ...}`` as ``["train.lr=0.0001", ...]`` (``None`` becomes ``null``)."""
    out = []
    for key, value in job.get("overrides", {}).items():
        if key == "model.name" and isinstance(value, str):
            value = resolve_model_name(value)
        text = "null" if value is None else json.dumps(value) if isinstance(value, list | dict) else value
        out.append(f"{key}={str(text).lower() if isinstance(value, bool) else text}")
    return out


def job_config(job: dict[str, Any], *extra: str):
    """The experiment's job as a validated ``JobConfig`` (recipe + overrides + ``extra``)."""
    from distributed_ft.config import load_config

    config, _ = load_config(job.get("recipe", "ner-conll2003"), [*overrides_list(job), *extra])
    return config


def subprocess_env(threads: int | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for launched jobs: no inherited rank variables, the repo importable, threads pinned."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update({"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra or {})
    return env


def interleaved(variants: list[str], repeats: int) -> list[tuple[int, str]]:
    """``(repeat, variant)`` in ABBA order: forward on even repeats, backward on odd ones."""
    order = []
    for rep in range(repeats):
        order += [(rep, v) for v in (variants if rep % 2 == 0 else variants[::-1])]
    return order


def paired_ratios(
    records: list[dict[str, Any]], metric: str, numerator: str, denominator: str
) -> dict[str, Any]:
    """Per-repeat ratios ``numerator / denominator`` of ``metric`` (runs of one repeat sit side by side)."""
    by = {(r["repeat"], r["variant"]): r for r in records if r.get(metric) is not None}
    ratios = [
        by[(rep, numerator)][metric] / by[(rep, denominator)][metric]
        for rep in sorted({r for r, _ in by})
        if (rep, numerator) in by and (rep, denominator) in by and by[(rep, denominator)][metric]
    ]
    return {
        "comparison": f"{numerator} / {denominator}",
        "metric": metric,
        "value": median(ratios),
        "per_repeat": ratios,
        "min": min(ratios) if ratios else None,
        "max": max(ratios) if ratios else None,
    }
