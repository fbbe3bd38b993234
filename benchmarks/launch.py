"""The same ``dft train`` job under different launchers and worker counts (torchrun, Ray Train).

Each variant is a real ``dft train`` process tree (``torchrun ... -m distributed_ft train`` or
``python -m distributed_ft train ... run.backend=ray``), launched from here with ``train.log_every=1`` so
that rank 0 writes one ``metrics.jsonl`` event per optimizer step. From those time stamps:

* **steady state**: step times after the warm-up steps (p50/p90) and job-wide samples/s and tokens/s;
  per-step token counts are exact: the library's batch plan is a pure function of (seed, epoch, rank,
  world size), so it is replayed here over the same prepared data;
* **start-up**: launch to the end of the first step, minus one steady-state step (the time before the
  first step could start: interpreter, imports, process group, Ray cluster and workers, data, model);
* **tail**: end of the last step to process exit (final evaluation, export, shutdown).

Variants run in ABBA order; ratios are per repeat. A variant that fails (Ray under load, say) is recorded
with the tail of its output instead of stopping the experiment.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    compute_units,
    interleaved,
    job_config,
    median,
    mfu,
    model_flops_per_token,
    overrides_list,
    paired_ratios,
    peak_flops,
    percentile,
    step_summary,
    subprocess_env,
)
from benchmarks.cpu_share import CpuSampler, cpu_between


def command(variant: dict[str, Any], job: dict[str, Any], run_dir: Path) -> list[str]:
    """The command line of one variant."""
    workers = int(variant.get("workers", 1))
    args = [
        "-q",
        "train",
        job.get("recipe", "ner-conll2003"),
        *overrides_list(job),
        f"run.output_dir={run_dir}",
        "run.resume=never",
        f"run.num_workers={workers}",
        "train.log_every=1",
    ]
    launcher = variant.get("launcher", "torchrun")
    if launcher == "torchrun":
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        return [torchrun, "--standalone", "--nproc_per_node", str(workers), "-m", "distributed_ft", *args]
    if launcher == "ray":
        return [sys.executable, "-m", "distributed_ft", *args, "run.backend=ray"]
    if launcher == "local":
        return [sys.executable, "-m", "distributed_ft", *args]
    raise ValueError(f"unknown launcher {launcher!r}")


def step_times(run_dir: Path) -> list[tuple[int, float]]:
    """``(step, wall time)`` of each training event in ``metrics.jsonl`` (the last record of a step wins)."""
    steps: dict[int, float] = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "train":
            steps[int(record["step"])] = float(record["time"])
    return sorted(steps.items())


def replay_tokens(config: Any, task: Any, split: Any, world_size: int, steps: int) -> dict[str, list[int]]:
    """Job-wide samples, real and padded tokens of each optimizer step, from the library's batch plan."""
    from distributed_ft.train.loop import training_source

    totals = {"samples": [0] * steps, "real": [0] * steps, "padded": [0] * steps}
    accum = config.train.grad_accum
    for rank in range(world_size):
        source = training_source(config, task, split, rank, world_size)
        step, epoch, micro = 0, 0, 0
        while step < steps:
            source.set_epoch(epoch)
            for batch in source:
                mask = batch["attention_mask"]
                totals["samples"][step] += int(mask.shape[0])
                totals["real"][step] += int(mask.sum())
                totals["padded"][step] += int(mask.numel())
                micro += 1
                if micro % accum == 0 or source.position == len(source):
                    step += 1
                    if step >= steps:
                        break
            epoch += 1
    return totals


def launch(name: str, variant: dict[str, Any], job: dict[str, Any], run_dir: Path, timeout: float) -> dict:
    """Run one variant; returns its time stamps and exit status."""
    extra = {"RAY_USAGE_STATS_ENABLED": "0", **{k: str(v) for k, v in variant.get("env", {}).items()}}
    env = subprocess_env(threads=int(variant.get("threads", 1)), extra=extra)
    env.pop("RAY_ADDRESS", None)  # a fresh local Ray per run, never someone else's cluster
    cmd = command(variant, job, run_dir)
    sampler = CpuSampler().start()
    launched = time.time()
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        code, output = process.returncode, (stdout[-2000:] + "\n" + stderr[-4000:])
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        code, output = None, f"timed out after {timeout:.0f} s: {stderr[-3000:]}"
    exited = time.time()
    return {
        "variant": name,
        "command": " ".join(cmd),
        "launched": launched,
        "exited": exited,
        "returncode": code,
        "output_tail": output,
        "steps": step_times(run_dir),
        "cpu_samples": sampler.stop(),
    }


def is_training_process(launcher: str) -> Callable[[str], bool]:
    """Whether a process (by its command line) is one of the job's training ranks under ``launcher``."""
    if launcher == "ray":
        return lambda name: name.startswith("ray::RayTrainWorker")
    return lambda name: "-m distributed_ft" in name and "torchrun" not in name


def measure(
    raw: dict[str, Any], tokens: dict[str, list[int]], warmup: int, workers: int, launcher: str = "torchrun"
) -> dict[str, Any]:
    """Steady-state, start-up and tail numbers of one launch, and who used the CPUs in the steady state."""
    stamps = [t for _, t in raw["steps"]]
    durations = [b - a for a, b in itertools.pairwise(stamps)]
    n = len(durations)
    summary = step_summary(
        durations,
        tokens["samples"][1 : n + 1],
        tokens["real"][1 : n + 1],
        tokens["padded"][1 : n + 1],
        warmup,
    )
    p50 = summary["step_s_p50"] or 0.0
    first = stamps[0] - raw["launched"] if stamps else None
    return {
        **summary,
        "workers": workers,
        "time_to_first_step_s": first,
        "startup_s": None if first is None else first - p50,
        "tail_s": raw["exited"] - stamps[-1] if stamps else None,
        "wall_s": raw["exited"] - raw["launched"],
        "step_s_p99": percentile(durations[warmup:], 0.99),
        "cpu": cpu_between(
            raw.pop("cpu_samples", []),
            stamps[min(warmup, len(stamps) - 1)] if stamps else 0.0,
            stamps[-1] if stamps else 0.0,
            is_training_process(launcher),
        ),
    }


def run(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Launch every variant ``repeats`` times (ABBA) and compare."""
    from distributed_ft.train.job import data_splits, load_task

    params = spec["params"]
    variants: dict[str, dict[str, Any]] = params["variants"]
    repeats, warmup = int(params.get("repeats", 2)), int(params.get("warmup_steps", 3))
    timeout = float(params.get("timeout_s", 600))
    job = spec["job"]
    config = job_config(job)
    tokenizer, task = load_task(config)
    prepared = task.prepare_data(tokenizer, data_splits(config))  # warm the cache
    peak = peak_flops()
    records, failures, raws = [], [], []
    floors = []
    for rep, name in interleaved(list(variants), repeats):
        variant = variants[name]
        if params.get("ray_floor") and variant.get("launcher") == "ray":
            floors.append(ray_floor(int(variant.get("workers", 1)), workdir / f"floor-{rep}", timeout))
        raw = launch(name, variant, job, workdir / f"{name}-{rep}", timeout)
        raw["repeat"] = rep
        raws.append(raw)
        if raw["returncode"] != 0 or len(raw["steps"]) < 2:
            failures.append({"variant": f"{name} (repeat {rep})", "reason": _reason(raw)})
            continue
        workers = int(variant.get("workers", 1))
        tokens = replay_tokens(config, task, prepared.splits["train"], workers, len(raw["steps"]))
        result = measure(raw, tokens, warmup, workers, variant.get("launcher", "torchrun"))
        flops = model_flops_per_token(
            config.model.name,
            config.task,
            len(prepared.labels),
            result["mean_padded_len"] or 1,
            peft_method=config.peft.method,
        )
        threads = int(variant.get("threads", 1))
        units = compute_units(peak, workers, threads)
        result["mfu"] = mfu(result["real_tokens_per_s"], flops, peak["flops"], devices=units)
        records.append({"variant": name, "repeat": rep, **variant, **result})
    summary = summarize(records, variants, failures, params, peak, raws)
    if floors:
        summary["tables"].append(floor_table(floors, records))
        summary["floors"] = floors
    return summary


def ray_floor(workers: int, stamps: Path, timeout: float) -> dict[str, Any]:
    """Start-up and tail of a Ray Train job whose workers do nothing (:mod:`benchmarks.ray_floor`)."""
    from benchmarks.ray_floor import floor_times

    env = subprocess_env(threads=1, extra={"RAY_USAGE_STATS_ENABLED": "0"})
    env.pop("RAY_ADDRESS", None)
    launched = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.ray_floor", str(workers), str(stamps)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the Ray floor job failed: {done.stderr[-1500:]}")
    return floor_times(launched, time.time(), stamps)


def floor_table(floors: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Ray's own floor next to the measured start-up and tail of each launcher (medians over repeats)."""

    def med(launcher: str, key: str) -> float | None:
        return median(r.get(key) for r in records if r.get("launcher", "torchrun") == launcher)

    floor = {key: median(f[key] for f in floors) for key in ("startup_s", "tail_s")}
    rows = []
    for key, label in (("startup_s", "start-up s"), ("tail_s", "tail s")):
        ray, torchrun = med("ray", key), med("torchrun", key)
        over = None if ray is None or torchrun is None else ray - torchrun
        above = None if ray is None or floor[key] is None else ray - floor[key]
        rows.append([label, torchrun, ray, over, floor[key], above])
    return {
        "title": "Ray's own floor (a Ray Train job whose workers do nothing)",
        "columns": ["", "torchrun", "ray", "ray - torchrun", "Ray floor", "ray - floor"],
        "rows": rows,
        "caption": "Ray floor: launch to the first no-op worker starting (import ray, local cluster, worker "
        "group, torch process group), and the last one ending to exit (Ray Train teardown, ray.shutdown); "
        f"median of {len(floors)} runs interleaved with the others. ray - floor: what the job adds on top.",
    }


def _largest_others(runs: list[dict[str, Any]], top: int = 3) -> str:
    """The other processes that used the most CPU in the steady state, summed over runs."""
    totals: dict[str, float] = {}
    for run in runs:
        for name, cores in (run.get("cpu") or {}).get("others", []):
            key = name.split(" ")[0].rsplit("/", 1)[-1]
            totals[key] = totals.get(key, 0.0) + cores / len(runs)
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:top]
    return ", ".join(f"{name} {cores:.3f}" for name, cores in ranked) or "-"


def _reason(raw: dict[str, Any]) -> str:
    if raw["returncode"] is None:
        return raw["output_tail"][-800:]
    lines = [line for line in raw["output_tail"].splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "exception" in line.lower()]
    return f"exit {raw['returncode']}: " + " | ".join((errors or lines)[-4:])[-800:]


def summarize(
    records: list[dict[str, Any]],
    variants: dict[str, dict[str, Any]],
    failures: list[dict[str, str]],
    params: dict[str, Any],
    peak: dict[str, Any],
    raws: list[dict[str, Any]],
) -> dict[str, Any]:
    names = list(variants)
    baseline = params.get("baseline", names[0])
    ratios = []
    for name in names:
        if name == baseline:
            continue
        for metric in ("samples_per_s", "step_s_p50", "time_to_first_step_s", "wall_s"):
            ratios.append(paired_ratios(records, metric, name, baseline))
    scaling = params.get("scaling")
    if scaling:
        one, two = scaling["one"], scaling["two"]
        eff = paired_ratios(records, "samples_per_s", two, one)
        workers = int(variants[two].get("workers", 2)) / int(variants[one].get("workers", 1))
        ratios.append(
            {
                "comparison": f"{two} / ({workers:g} x {one})",
                "metric": "scaling efficiency (samples/s)",
                "value": None if eff["value"] is None else eff["value"] / workers,
                "per_repeat": [r / workers for r in eff["per_repeat"]],
                "note": "1.0 = linear scaling",
            }
        )
        if scaling.get("same_cores"):
            ratios.append(
                {
                    **paired_ratios(records, "samples_per_s", two, scaling["same_cores"]),
                    "note": "same cores: data parallel processes vs one process with all threads",
                }
            )
    rows = []
    for name in names:
        runs = [r for r in records if r["variant"] == name]
        if not runs:
            rows.append([name, 0, *([None] * 14)])
            continue

        def med(key: str, runs: list[dict[str, Any]] = runs) -> float | None:
            return median(r.get(key) for r in runs)

        v = variants[name]
        rows.append(
            [
                name,
                len(runs),
                f"{v.get('launcher', 'torchrun')}, {v.get('workers', 1)} x {v.get('threads', 1)} thr",
                med("step_s_p50"),
                med("step_s_p90"),
                med("samples_per_s"),
                med("real_tokens_per_s"),
                med("padded_tokens_per_s"),
                med("mfu"),
                med("time_to_first_step_s"),
                med("startup_s"),
                med("tail_s"),
                med("wall_s"),
                median((r.get("cpu") or {}).get("training_cores") for r in runs),
                median((r.get("cpu") or {}).get("other_cores") for r in runs),
                _largest_others(runs),
            ]
        )
    columns = [
        "variant",
        "runs",
        "launcher, workers x threads",
        "step s p50",
        "step s p90",
        "samples/s",
        "real tok/s",
        "padded tok/s",
        "MFU",
        "first step at s",
        "start-up s",
        "tail s",
        "wall s",
        "ranks' cores",
        "other cores",
        "largest others (cores)",
    ]
    labels = [r[0] for r in rows]
    return {
        "ratios": ratios,
        "tables": [
            {
                "title": "Per variant (median over repeats)",
                "columns": columns,
                "rows": rows,
                "caption": "start-up = launch to the end of step 1 minus one p50 step; tail = last step to "
                f"exit (test evaluation, export, shutdown). MFU: real tokens/s x model FLOPs per token / "
                f"({peak['source']} x workers x threads). Cores: CPU time per second in the steady state "
                "(after the warm-up steps) of the training ranks and of every other process on the machine "
                "(an orchestrator's daemons and driver, a launcher's agent, anything else), from /proc.",
            }
        ],
        "plots": [
            {
                "title": "samples/s (steady state)",
                "ylabel": "samples/s",
                "labels": labels,
                "series": {"": [r[5] for r in rows]},
            },
            {
                "title": "seconds",
                "ylabel": "s",
                "labels": labels,
                "series": {
                    "start-up": [r[10] for r in rows],
                    "tail": [r[11] for r in rows],
                    "wall": [r[12] for r in rows],
                },
            },
        ],
        "records": records,
        "launches": [
            {k: v for k, v in raw.items() if k not in ("output_tail", "cpu_samples")} for raw in raws
        ],
        "failures": failures,
        "required_failed": False,
        "notes": [],
    }
