"""Run a benchmark experiment described by ``benchmarks/experiments/NAME.yaml`` and write its results.

An experiment file holds ``kind`` (which module runs it), ``description``, ``job`` (a recipe plus
dotted overrides shared by every variant), ``params`` (the experiment's knobs) and ``smoke`` (the same keys,
merged over the full run for a seconds-long CI variant). ``python -m benchmarks NAME [--smoke] [--json]``
ends here; ``dft bench NAME ...`` runs that command in the checkout.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import RESULTS, SMOKE_RESULTS, environment
from benchmarks.report import to_markdown, write_results

EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"
KINDS = {
    "loops": "benchmarks.loops",
    "launchers": "benchmarks.launch",
    "zero": "benchmarks.zero",
    "data_pipeline": "benchmarks.data_pipeline",
    "zero3_load": "benchmarks.zero3_load",
    "data_scale": "benchmarks.data_scale",
    "quality": "benchmarks.quality",
}
"""``kind`` -> the module whose ``run(spec, workdir)`` returns the payload."""


class ExperimentError(Exception):
    """An unknown experiment or a malformed experiment file."""


def experiment_names() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def merge_smoke(spec: dict[str, Any], smoke: dict[str, Any]) -> dict[str, Any]:
    """The smoke section over the spec: ``job.overrides`` merged key by key, other keys replaced.

    ``params`` are replaced one key at a time (a smoke ``variants`` mapping replaces the whole mapping).
    """
    out = copy.deepcopy(spec)
    job = smoke.get("job", {})
    out.setdefault("job", {}).setdefault("overrides", {}).update(copy.deepcopy(job.get("overrides", {})))
    out["job"].update({k: copy.deepcopy(v) for k, v in job.items() if k != "overrides"})
    out.setdefault("params", {}).update(copy.deepcopy(smoke.get("params", {})))
    unknown = set(smoke) - {"job", "params"}
    if unknown:
        raise ExperimentError(f"smoke: only 'job' and 'params' can change, not {sorted(unknown)}")
    return out


def load_experiment(name: str, smoke: bool = False) -> dict[str, Any]:
    """The experiment spec, with its ``smoke`` section merged in when ``smoke``."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else EXPERIMENTS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ExperimentError(f"no experiment {name!r}; available: {', '.join(experiment_names())}")
    spec = yaml.safe_load(path.read_text()) or {}
    for key in ("kind", "description"):
        if key not in spec:
            raise ExperimentError(f"{path}: missing {key!r}")
    if spec["kind"] not in KINDS:
        raise ExperimentError(f"{path}: unknown kind {spec['kind']!r}; known: {', '.join(KINDS)}")
    unknown = set(spec) - {"kind", "description", "job", "params", "smoke"}
    if unknown:
        raise ExperimentError(f"{path}: unknown keys {sorted(unknown)}")
    smoke_part = spec.pop("smoke", {}) or {}
    if smoke:
        spec = merge_smoke(spec, smoke_part)
    spec.setdefault("job", {}).setdefault("overrides", {})
    spec.setdefault("params", {})
    spec["name"], spec["smoke"] = path.stem, smoke
    return spec


def run_experiment(
    name: str, *, smoke: bool = False, out_dir: Path | None = None, workdir: Path | None = None
) -> dict[str, Any]:
    """Run one experiment and write its JSON, markdown and PNG; returns the payload (with ``files``)."""
    spec = load_experiment(name, smoke)
    module = importlib.import_module(KINDS[spec["kind"]])
    env = environment()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"dft-bench-{spec['name']}-") as tmp:
        payload = module.run(spec, Path(workdir or tmp))
    payload.update(
        experiment=spec["name"],
        smoke=smoke,
        description=spec["description"],
        spec={k: spec[k] for k in ("kind", "job", "params")},
        env=env,
        wall_seconds=time.perf_counter() - started,
        load_average_end=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )
    write_results(payload, out_dir or (SMOKE_RESULTS if smoke else RESULTS))
    return payload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m benchmarks`` (``dft bench`` runs it with the same ones)."""
    parser.add_argument(
        "experiment", nargs="?", help="experiment name (see --list) or a YAML file; 'all' runs each"
    )
    parser.add_argument("--smoke", action="store_true", help="the seconds-long variant CI runs")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of markdown")
    parser.add_argument(
        "--out", type=Path, help="results directory (default benchmarks/results[/tmp for --smoke])"
    )
    parser.add_argument("--list", action="store_true", help="list the experiments")


def main_args(args: argparse.Namespace) -> int:
    """Run what ``args`` asks for; prints the markdown (or JSON) report and where the files went."""
    if args.list or not args.experiment:
        names = experiment_names()
        width = max(map(len, names)) + 2
        for name in names:
            spec = load_experiment(name)
            print(f"{name:<{width}}{spec['description'].strip().splitlines()[0]}")
        return 0
    names = experiment_names() if args.experiment == "all" else [args.experiment]
    failed = 0
    for name in names:
        # with --json, stdout carries only the JSON: what libraries print while importing goes to stderr
        quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
        try:
            with quiet:
                payload = run_experiment(name, smoke=args.smoke, out_dir=Path(args.out) if args.out else None)
        except ExperimentError as exc:
            print(f"bench: error: {exc}", file=sys.stderr)
            return 2
        failed += bool(payload.get("failures")) and payload.get("required_failed", False)
        if args.json:
            print(json.dumps(payload, indent=2, default=str))
        else:
            print(to_markdown(payload))
            print("\n".join(f"wrote {path}" for path in payload["files"].values()))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main_args(parser.parse_args(argv))
