"""ZeRO stages x full fine-tuning / LoRA x offload: per-rank memory and step time, on N processes.

One ``torchrun`` launch runs every case in turn (rounds in ABBA order); each case is
:func:`distributed_ft.train.measure.validate_plan`: the library's model (PEFT applied) and engine
(``DeepSpeedEngine`` or ``TorchEngine``), a few optimizer steps on synthetic full-length batches,
``engine.state_bytes()`` per rank before the optimizer step (parameters, gradients, optimizer states
counted from the tensors), saved-tensor bytes of one forward pass, and the step times. Next to each
measurement: the planner's prediction and DeepSpeed's own estimator.

All cases share one process per rank, so RSS is cumulative (reported, not compared); the state bytes are
exact per case. On a CPU-only machine "offload" moves states between two places in the same RAM: the
bytes are the same, only the step time shows the cost of the offload code path.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import interleaved, median, overrides_list, percentile, subprocess_env

MiB = 2**20


def cases(params: dict[str, Any]) -> dict[str, list[str]]:
    """``{"full ZeRO-2": [overrides...], ...}``: every method x placement."""
    out = {}
    for method, method_overrides in params["methods"].items():
        for placement, placement_overrides in params["placements"].items():
            merged = {"overrides": {**method_overrides, **placement_overrides}}
            out[f"{method} {placement}"] = overrides_list(merged)
    return out


# --------------------------------------------------------------------------- worker (one rank)
def worker(spec_path: Path, out_path: Path) -> None:
    """Run every case on this rank; rank 0 writes the reports."""
    import gc

    import torch
    import transformers

    from benchmarks.common import job_config
    from distributed_ft.runtime.context import create_context
    from distributed_ft.train.measure import validate_plan

    transformers.logging.set_verbosity_error()
    spec = json.loads(spec_path.read_text())
    params = spec["params"]
    context = create_context()
    all_cases = cases(params)
    results, failures = [], []
    for rnd, name in interleaved(list(all_cases), int(params.get("rounds", 2))):
        config = job_config(spec["job"], *all_cases[name])
        torch.manual_seed(0)
        started = time.perf_counter()
        try:
            report = validate_plan(
                config, context, labels=params.get("labels"), steps=int(params.get("steps", 4))
            )
        except Exception as exc:  # keep going; the other cases still measure
            failures.append(
                {"variant": f"{name} (round {rnd})", "reason": f"{type(exc).__name__}: {exc}"[:800]}
            )
            context.barrier()
            continue
        record = report.to_json()
        record.update(case=name, round=rnd, seconds=time.perf_counter() - started, text=report.format_table())
        results.append(record)
        gc.collect()
    if context.is_main:
        out_path.write_text(json.dumps({"results": results, "failures": failures}, default=str))
    context.barrier()


# --------------------------------------------------------------------------- experiment (parent)
def run(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Launch the worker under torchrun and summarise what it measured."""
    params = spec["params"]
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = workdir / "zero-spec.json", workdir / "zero-results.json"
    spec_path.write_text(json.dumps({"job": spec["job"], "params": params}))
    workers = int(params.get("workers", 2))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node", str(workers), __file__, "--worker"]
    cmd += ["--spec", str(spec_path), "--out", str(out_path)]
    env = subprocess_env(threads=int(params.get("threads", 1)))
    started = time.time()
    failures = []
    try:
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=float(params.get("timeout_s", 900))
        )
        if done.returncode != 0:
            failures.append(
                {"variant": "torchrun launch", "reason": f"exit {done.returncode}: {done.stderr[-1500:]}"}
            )
    except subprocess.TimeoutExpired as exc:
        failures.append(
            {"variant": "torchrun launch", "reason": f"timed out: {str(exc.stderr or '')[-1500:]}"}
        )
    data = json.loads(out_path.read_text()) if out_path.is_file() else {"results": [], "failures": []}
    payload = summarize(data["results"], list(cases(params)), params)
    payload["failures"] = failures + data["failures"]
    payload["required_failed"] = not data["results"]
    payload["launch_seconds"] = time.time() - started
    return payload


def summarize(results: list[dict[str, Any]], names: list[str], params: dict[str, Any]) -> dict[str, Any]:
    """Memory table (measured vs planner vs DeepSpeed), step-time table and ratios to ZeRO-0."""
    by_case: dict[str, list[dict[str, Any]]] = {}
    for record in results:
        by_case.setdefault(record["case"], []).append(record)
    memory_rows, time_rows, records = [], [], []
    baseline: dict[str, dict[str, float]] = {}
    round_p50: dict[tuple[str, int], float | None] = {}
    for name in names:
        runs = by_case.get(name)
        if not runs:
            continue
        first = runs[0]
        measured, predicted, errors = first["measured"], first["predicted"], first["errors"]
        states = sum(measured[k] for k in ("parameters", "gradients", "optimizer_states"))
        planned = sum(predicted[k] for k in ("parameters", "gradients", "optimizer_states"))
        ref = first.get("reference") or {}
        steps = [s for r in runs for s in r["ranks"][0]["step_seconds"][2:]]
        p50 = percentile(steps, 0.5)
        rounds = {r["round"]: percentile(r["ranks"][0]["step_seconds"][2:], 0.5) for r in runs}
        round_p50.update({(name, rnd): value for rnd, value in rounds.items()})
        method = name.split(" ", 1)[0]
        if name.endswith("ZeRO-0"):
            baseline[method] = {"states": states, "p50": p50 or 0.0}
        record = {
            "case": name,
            "method": method,
            "setup": first["setup"],
            "measured": measured,
            "predicted": predicted,
            "errors": errors,
            "model_states_bytes": states,
            "planner_model_states_bytes": planned,
            "deepspeed_estimate_bytes": ref.get("model_states"),
            "deepspeed_error": first.get("reference_error"),
            "step_s_p50": p50,
            "round_p50": rounds,
            "step_s_p90": percentile(steps, 0.9),
            "steps_measured": len(steps),
            "rss_bytes_rank0": median(r["ranks"][0]["rss_bytes"] for r in runs),
            "ranks_model_states": [
                sum(rank["state_bytes"][k] for k in ("parameters", "gradients", "optimizer_states"))
                for rank in first["ranks"]
            ],
        }
        records.append(record)
        memory_rows.append(
            [
                name,
                first["setup"]["trainable_params"],
                measured["parameters"] / MiB,
                measured["gradients"] / MiB,
                measured["optimizer_states"] / MiB,
                states / MiB,
                planned / MiB,
                errors["model_states"],
                None if ref.get("model_states") is None else ref["model_states"] / MiB,
                first.get("reference_error"),
                measured["activations"] / MiB,
                errors["activations"],
            ]
        )
    for record in records:
        base = baseline.get(record["method"])
        record["states_vs_zero0"] = record["model_states_bytes"] / base["states"] if base else None
        record["step_vs_zero0"] = (record["step_s_p50"] / base["p50"]) if base and base["p50"] else None
        time_rows.append(
            [
                record["case"],
                record["steps_measured"],
                record["step_s_p50"],
                record["step_s_p90"],
                record["step_vs_zero0"],
                record["states_vs_zero0"],
                None if record["rss_bytes_rank0"] is None else record["rss_bytes_rank0"] / MiB,
            ]
        )
    ratios = []
    for record in records:
        if record["case"].endswith("ZeRO-0"):
            continue
        base = f"{record['method']} ZeRO-0"
        per_round = [
            mine / theirs
            for rnd, mine in record["round_p50"].items()
            if (theirs := round_p50.get((base, rnd)))
        ]
        ratios.append(
            {
                "comparison": f"{record['case']} / {base}",
                "metric": "step time p50",
                "value": record["step_vs_zero0"],
                "per_repeat": per_round,
                "note": f"model states per rank x{record['states_vs_zero0']:.3g}"
                if record["states_vs_zero0"] is not None
                else "",
            }
        )
    labels = [r["case"] for r in records]
    batch = f"{params.get('workers', 2)} ranks x {params.get('threads', 1)} thread"
    return {
        "ratios": ratios,
        "tables": [
            {
                "title": "Per-rank model states (rank 0): measured vs planner vs DeepSpeed estimator (MiB)",
                "columns": [
                    "case",
                    "trainable",
                    "params",
                    "grads",
                    "optim",
                    "measured sum",
                    "planner sum",
                    "planner err",
                    "DeepSpeed est.",
                    "DeepSpeed err",
                    "activations",
                    "planner act. err",
                ],
                "rows": memory_rows,
                "caption": "Measured = engine.state_bytes() before the optimizer step (gradients alive, Adam "
                "moments allocated); errors = (estimate - measured) / measured, worst rank for the planner. "
                "Activations: saved-tensor bytes of one forward pass (saved_tensors_hooks).",
            },
            {
                "title": f"Step time ({batch} each; synthetic batches)",
                "columns": [
                    "case",
                    "steps",
                    "step s p50",
                    "step s p90",
                    "step vs ZeRO-0",
                    "memory vs ZeRO-0",
                    "RSS MiB rank 0 (cumulative process)",
                ],
                "rows": time_rows,
            },
        ],
        "plots": [
            {
                "title": "model states per rank (MiB)",
                "ylabel": "MiB",
                "labels": labels,
                "series": {
                    "measured": [r["model_states_bytes"] / MiB for r in records],
                    "planner": [r["planner_model_states_bytes"] / MiB for r in records],
                    "DeepSpeed est.": [(r["deepspeed_estimate_bytes"] or 0) / MiB for r in records],
                },
            },
            {
                "title": "step time p50 (s)",
                "ylabel": "s",
                "labels": labels,
                "series": {"": [r["step_s_p50"] for r in records]},
            },
        ],
        "records": records,
        "raw": results,
        "notes": [],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    worker(args.spec, args.out)


if __name__ == "__main__":
    main()
