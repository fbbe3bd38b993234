"""Hyper-parameter search on Ray Tune: ``dft tune``, each trial the library's own training job.

Each trial is a Tune function trial that runs :func:`distributed_ft.train.loop.train` in its own process
(the local backend, one process, the resources ``--cpus-per-trial`` / ``--gpus-per-trial`` reserve), its run
directory ``RUN_DIR/trials/<trial>``. The seam is the one the loop already calls: the checkpoint written at
each evaluation is handed to ``context.report`` with the validation metrics, and :class:`TrialContext`
(a :class:`~distributed_ft.runtime.context.LocalContext`) forwards ``eval.metric`` from there to
``ray.tune.report`` with the step. ASHA (``time_attr="step"``, optimizer steps) compares trials at
rungs of ``grace_period x reduction_factor^k`` steps and stops the ones below the cut, so a trial can be
stopped at any evaluation after the grace period.

The driver writes to ``RUN_DIR``: ``results.csv`` and ``results.md`` (trial, sampled values, best
``eval.metric`` and its step, steps trained, stopped early, wall seconds, status) and ``best.yaml``, the
resolved config of the best trial (``run.output_dir`` left out, so ``dft train best.yaml`` makes a new
run). The best trial is the best ``eval.metric`` among the trials that ran to their end (trials ASHA
stopped only when none did). Its metric is the validation ``eval.metric`` of its best checkpoint, which
is ``results.json``'s ``dev[eval.metric]``; every seed is in the config, so ``dft train best.yaml`` trains
the same steps and reproduces it (on the same hardware and thread count: ``run.num_threads``).

Ray imports stay inside the functions: this module imports without Ray installed.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distributed_ft.config.load import validate
from distributed_ft.config.schema import JobConfig
from distributed_ft.config.space import SearchSpace, apply_params, check_space
from distributed_ft.config.task_metrics import TASK_METRICS
from distributed_ft.errors import ConfigError, LaunchError
from distributed_ft.runtime.context import LocalContext

log = logging.getLogger("distributed_ft")
MAX_STEPS = 2**31
"""ASHA's ``max_t``: above any run's step count, so only the rungs stop a trial, never a step limit."""


@dataclass(frozen=True)
class TuneOptions:
    """How ``dft tune`` searches (the command's options)."""

    trials: int
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    """Trials at a time (default: as many as the resources allow)."""
    grace_period: int | None = None
    """Optimizer steps every trial trains before ASHA may stop it (default: ``train.eval_every``)."""
    reduction_factor: float = 2.0
    """ASHA keeps the best ``1 / reduction_factor`` of the trials at each rung."""
    seed: int | None = None
    """Seed of the sampled values (default: ``train.seed``)."""


@dataclass
class TrialRow:
    """One trial of the results table."""

    trial: str
    params: dict[str, Any]
    best_metric: float | None
    best_step: int | None
    steps: int | None
    stopped_early: bool
    wall_s: float | None
    status: str = "ok"
    """``ok``, or ``error: ...`` for a trial that failed."""


@dataclass
class TuneSummary:
    """What ``dft tune`` wrote: the rows, the best trial and the files."""

    run_dir: Path
    metric: str
    mode: str
    rows: list[TrialRow]
    best: TrialRow
    files: dict[str, Path] = field(default_factory=dict)


def search_mode(task: str, metric: str) -> str:
    """``max`` or ``min``: which way ``metric`` of ``task`` improves."""
    return TASK_METRICS[task][metric]


class TrialContext(LocalContext):
    """A one-process trial that reports its validation ``metric`` to Ray Tune at each evaluation.

    The loop hands every checkpoint to :meth:`report`, with ``validation/<metric>`` when an evaluation
    wrote it (``save_every`` checkpoints carry none and are not reported); the end of the run is reported
    once more with the last value and ``finished``, which tells a completed trial from a stopped one.
    """

    def __init__(self, metric: str, use_gpu: bool | str = False) -> None:
        super().__init__(use_gpu=use_gpu)
        self.metric = metric
        self.last: float | None = None

    def report(
        self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, files: list[Path] | None = None
    ) -> None:
        from ray import tune

        value = metrics.get(f"validation/{self.metric}")
        if value is not None:
            self.last = float(value)
            tune.report({"step": int(metrics["step"]), self.metric: self.last})
        elif metrics.get("done") and self.last is not None:
            tune.report({"step": int(metrics["step"]), self.metric: self.last, "finished": True})


def run_trial(params: dict[str, Any], payload: dict[str, Any]) -> None:
    """A Tune trial: the base config with the sampled ``params``, trained in this process."""
    import transformers
    from ray import tune

    from distributed_ft.runtime.context import set_intra_op_threads
    from distributed_ft.runtime.tracking import setup_logging
    from distributed_ft.train.loop import train

    if os.path.isdir(payload["cwd"]):  # Tune starts a trial in its own directory: back to the driver's
        os.chdir(payload["cwd"])
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    trial = tune.get_context().get_trial_name()
    raw = apply_params(payload["base"], {k: _plain(v) for k, v in params.items()})
    raw["run"]["output_dir"] = str(Path(payload["run_dir"]) / "trials" / trial)
    config = validate(raw)
    context = TrialContext(config.eval.metric, config.run.use_gpu)
    setup_logging(context)
    log.info(set_intra_op_threads(config.run.num_threads, local_world_size=1))  # Ray: OMP_NUM_THREADS=CPUs
    train(config, context, payload["name"])


def _plain(value: Any) -> Any:
    """A sampled value as a plain Python value (Ray may hand numpy scalars)."""
    return value.item() if hasattr(value, "item") else value


def _distribution(kind: str, args: tuple[Any, ...]) -> Any:
    from ray import tune

    if kind == "choice":
        return tune.choice(list(args))
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](*args)


def tune_run_dir(config: JobConfig, name: str) -> Path:
    """``run.output_dir``, or ``runs/<name>-tune-<YYYYmmdd-HHMMSS>``; a finished search is refused."""
    chosen = config.run.output_dir or f"runs/{name}-tune-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(chosen).resolve()
    if (run_dir / "results.csv").exists():
        raise ConfigError(
            f"{run_dir} holds a finished search (results.csv); set run.output_dir to a new directory"
        )
    return run_dir


def base_config(config: JobConfig, space: SearchSpace) -> dict[str, Any]:
    """The raw config every trial starts from (local backend, one process), checked against ``space``.

    Raises:
        ConfigError: No validation split (nothing to compare trials on), several workers per trial, or
            a bound or choice of ``space`` the config refuses.
    """
    if config.data.validation is None:
        raise ConfigError(
            "dft tune compares trials on the validation split, but data.validation is not set; "
            "set data.validation=FILE"
        )
    if config.run.num_workers not in (1, None):
        raise ConfigError(
            f"dft tune trains each trial in one process, but run.num_workers={config.run.num_workers}; "
            "set run.num_workers=1 and give each trial its resources with --cpus-per-trial / --gpus-per-trial"
        )
    if config.run.backend != "local":
        log.info("dft tune: each trial runs the local backend in its Tune trial (run.backend=local)")
    raw = config.model_dump(mode="json")
    raw["run"].update(backend="local", output_dir=None)
    check_space(space, raw)
    return raw


def tune_on_ray(config: JobConfig, name: str, space: SearchSpace, options: TuneOptions) -> TuneSummary:
    """Search ``space`` around ``config`` with ASHA on Ray Tune; write the results and ``best.yaml``.

    Connects to ``RAY_ADDRESS`` when set, else starts a local Ray (shut down again at the end).

    Raises:
        ConfigError: See :func:`base_config`; bad options.
        LaunchError: Every trial failed (the first error is shown).
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from distributed_ft.backends.ray_train import ray_init
    from distributed_ft.runtime.tracking import setup_logging

    setup_logging(LocalContext())
    if options.trials < 1:
        raise ConfigError(f"--trials must be at least 1 (got {options.trials})")
    if options.max_concurrent is not None and options.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be at least 1 (got {options.max_concurrent})")
    if not options.reduction_factor > 1:
        raise ConfigError(f"--reduction-factor must be above 1 (got {options.reduction_factor})")
    if config.run.use_gpu is True and not options.gpus_per_trial:
        raise ConfigError(
            "run.use_gpu=true but --gpus-per-trial is 0: a trial sees only the GPUs it reserves; "
            "pass --gpus-per-trial 1 (or a fraction to share a GPU), or set run.use_gpu=auto"
        )
    raw = base_config(config, space)
    run_dir = tune_run_dir(config, name)
    metric = config.eval.metric
    mode = search_mode(config.task, metric)
    grace = options.grace_period or config.train.eval_every or 1
    seed = config.train.seed if options.seed is None else options.seed
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"base": raw, "name": name, "run_dir": str(run_dir), "cwd": os.getcwd()}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, payload=payload),
        {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial},
    )
    log.info(
        "dft tune: %d trials of %s (%s %s), ASHA grace %d steps, reduction factor %g; results in %s",
        options.trials,
        ", ".join(space.keys),
        mode,
        metric,
        grace,
        options.reduction_factor,
        run_dir,
    )
    started_ray = ray_init(None if os.environ.get("RAY_ADDRESS") else os.cpu_count() or 1)
    try:
        tuner = tune.Tuner(
            trainable,
            param_space={d.key: _distribution(d.kind, d.args) for d in space.dimensions},
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                num_samples=options.trials,
                scheduler=ASHAScheduler(
                    time_attr="step",
                    max_t=MAX_STEPS,
                    grace_period=grace,
                    reduction_factor=options.reduction_factor,
                ),
                # the limit goes here: Tune ignores max_concurrent_trials beside a BasicVariantGenerator
                search_alg=BasicVariantGenerator(
                    random_state=seed, max_concurrent=options.max_concurrent or 0
                ),
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=config.run.storage_path or str(run_dir / "ray"),
                verbose=1 if config.run.progress else 0,
            ),
        )
        grid = tuner.fit()
        rows = [_row(result, metric, mode, space.keys) for result in grid]
    finally:
        if started_ray:
            ray.shutdown()
    rows.sort(key=lambda row: row.trial)
    summary = summarise(run_dir, metric, mode, rows)
    best_params = summary.best.params
    best = validate(apply_params(raw, best_params))
    summary.files = write_results(summary, best)
    return summary


def _trial_name(trial: Any) -> str:
    """``trial-00003``: the trial's number within the search (Ray's trial ids end in it)."""
    return f"trial-{str(trial.trial_id).rsplit('_', 1)[-1]}"


def _row(result: Any, metric: str, mode: str, keys: list[str]) -> TrialRow:
    """A trial's row from its Tune result (every report of the trial is in its metrics frame)."""
    params = {key: _plain(result.config[key]) for key in keys}
    name = Path(result.path).name if result.path else "?"
    last = result.metrics or {}
    frame = result.metrics_dataframe
    best_metric = best_step = None
    if frame is not None and metric in frame and len(frame):
        values = frame[metric].astype(float)
        index = values.idxmax() if mode == "max" else values.idxmin()
        best_metric, best_step = float(values[index]), int(frame["step"][index])
    status = "ok" if result.error is None else f"error: {' '.join(str(result.error).split())[:200]}"
    return TrialRow(
        trial=name,
        params=params,
        best_metric=best_metric,
        best_step=best_step,
        steps=int(last["step"]) if "step" in last else None,
        stopped_early=result.error is None and not last.get("finished", False),
        wall_s=round(float(last["time_total_s"]), 1) if "time_total_s" in last else None,
        status=status,
    )


def summarise(run_dir: Path, metric: str, mode: str, rows: list[TrialRow]) -> TuneSummary:
    """The summary with the best trial: the best metric among completed trials, else among all.

    Raises:
        LaunchError: No trial reported a metric (each failed; the first error is shown).
    """
    scored = [r for r in rows if r.status == "ok" and r.best_metric is not None]
    if not scored:
        errors = [r.status for r in rows if r.status != "ok"]
        raise LaunchError(
            f"no trial of the search reported {metric}: {errors[0] if errors else 'no evaluation ran'} "
            f"(trial logs: {run_dir / 'ray'})"
        )
    pool = [r for r in scored if not r.stopped_early] or scored
    sign = 1 if mode == "max" else -1
    best = max(pool, key=lambda r: sign * r.best_metric)
    return TuneSummary(run_dir, metric, mode, rows, best)


def _columns(summary: TuneSummary) -> list[str]:
    keys = list(summary.rows[0].params) if summary.rows else []
    metric = summary.metric
    return ["trial", *keys, f"best_{metric}", "best_step", "steps", "stopped_early", "wall_s", "status"]


def _values(row: TrialRow) -> list[Any]:
    return [
        row.trial,
        *row.params.values(),
        row.best_metric,
        row.best_step,
        row.steps,
        row.stopped_early,
        row.wall_s,
        row.status,
    ]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isnan(value):
        return f"{value:.6g}"
    return str(value)


def write_results(summary: TuneSummary, best: JobConfig) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and ``best.yaml`` (``best``'s config) into the run dir."""
    run_dir, columns = summary.run_dir, _columns(summary)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows([[_cell(v) for v in _values(row)] for row in summary.rows])
    files = {"csv": run_dir / "results.csv", "md": run_dir / "results.md", "best": run_dir / "best.yaml"}
    files["csv"].write_text(buffer.getvalue())
    best_row = summary.best
    lines = [
        f"# dft tune: {len(summary.rows)} trials, {summary.mode} validation {summary.metric}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(_cell(v) for v in _values(row)) + " |" for row in summary.rows),
        "",
        f"Best trial: {best_row.trial}, validation {summary.metric} {_cell(best_row.best_metric)} at step "
        f"{best_row.best_step} (its results.json dev.{summary.metric}); `dft train best.yaml` retrains it.",
        "stopped_early: ASHA stopped the trial at a rung (its run directory has no results.json).",
        "",
    ]
    files["md"].write_text("\n".join(lines))
    dumped = best.model_dump(mode="json")
    dumped["run"]["output_dir"] = None
    files["best"].write_text(yaml.safe_dump(dumped, sort_keys=False))
    log.info(
        "dft tune: best %s (%s %s); wrote %s", best_row.trial, summary.metric, best_row.best_metric, run_dir
    )
    return files
