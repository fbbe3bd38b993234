"""Experiment trackers ``MetricsLogger`` fans events out to: TensorBoard and MLflow (rank 0, ``track.*``).

The only ``mlflow`` importer; TensorBoard is written through ``torch.utils.tensorboard``. Both are
imported when a tracker is opened, so a job without ``track.tensorboard`` / ``track.mlflow`` needs neither.
``metrics.jsonl`` stays the record: a tracker only mirrors it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

from distributed_ft.config.schema import JobConfig
from distributed_ft.errors import ConfigError

INSTALL_HINT = "pip install distributed_ft[tracking]"
MLFLOW_RUN_FILE = "mlflow_run.json"
"""``RUN_DIR/mlflow_run.json``: the MLflow run of this run directory, continued when the run resumes."""
_PARAMS_PER_CALL = 100  # MLflow's limit on params in one log_batch
_PARAM_LENGTH = 6000  # MLflow's limit on a param value


class Tracker(Protocol):
    """A sink of scalars keyed like ``train/loss``; ``close(status)`` ends its run (``FINISHED``, ...)."""

    def log(self, scalars: dict[str, float], step: int, timestamp: float) -> None: ...

    def log_artifacts(self, path: Path) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


def open_trackers(run_dir: Path, config: JobConfig) -> list[Tracker]:
    """The trackers ``config.track`` asks for (call on rank 0 only)."""
    trackers: list[Tracker] = []
    if config.track.tensorboard:
        trackers.append(TensorBoardTracker(run_dir / "tensorboard"))
    if config.track.mlflow:
        trackers.append(MlflowTracker(run_dir, config))
    return trackers


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys: ``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class TensorBoardTracker:
    """Event files in ``directory`` (``RUN_DIR/tensorboard``)."""

    def __init__(self, directory: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's writer needs the tensorboard package
            raise ConfigError(f"track.tensorboard=true needs TensorBoard: {INSTALL_HINT}") from exc
        self.writer = SummaryWriter(str(directory))

    def log(self, scalars: dict[str, float], step: int, timestamp: float) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step, walltime=timestamp)

    def log_artifacts(self, path: Path) -> None:
        del path  # TensorBoard keeps no files

    def close(self, status: str = "FINISHED") -> None:
        del status
        self.writer.close()


class MlflowTracker:
    """One MLflow run named after the run directory: params, metrics per step, artifacts, status.

    The store is ``track.mlflow_tracking_uri``, or a local file store in ``RUN_DIR/mlruns``. A resumed
    run continues its MLflow run (``RUN_DIR/mlflow_run.json``) instead of starting another.
    """

    def __init__(self, run_dir: Path, config: JobConfig) -> None:
        try:
            from mlflow.entities import Metric, Param
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ConfigError(f"track.mlflow=true needs MLflow: {INSTALL_HINT}") from exc
        self._metric = Metric
        track = config.track
        uri = track.mlflow_tracking_uri
        if uri is None:
            uri = (run_dir / "mlruns").resolve().as_uri()
            # MLflow 3 keeps its file store behind this switch; the config chose that store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        marker = run_dir / MLFLOW_RUN_FILE
        try:
            self.client = MlflowClient(tracking_uri=uri)
            previous = json.loads(marker.read_text()) if marker.is_file() else {}
            if previous.get("tracking_uri") == uri:
                self.run_id = previous["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return
            experiment = self.client.get_experiment_by_name(track.mlflow_experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self.client.create_experiment(track.mlflow_experiment)
            )
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            params = [
                Param(key, str(value)[:_PARAM_LENGTH])
                for key, value in sorted(flatten(config.model_dump(mode="json")).items())
            ]
            for start in range(0, len(params), _PARAMS_PER_CALL):
                self.client.log_batch(self.run_id, params=params[start : start + _PARAMS_PER_CALL])
        except MlflowException as exc:
            raise ConfigError(f"MLflow tracking at {uri} failed: {exc}") from exc
        marker.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}))

    def log(self, scalars: dict[str, float], step: int, timestamp: float) -> None:
        millis = int(timestamp * 1000)
        metrics = [self._metric(key, float(value), millis, step) for key, value in scalars.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_artifacts(self, path: Path) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def replay_mlflow(run_dir: Path, config: JobConfig) -> str:
    """Log a finished run's ``metrics.jsonl``, ``export/`` and ``report/`` to MLflow; returns the run id.

    For a Ray run without ``track.mlflow_tracking_uri``: a worker's local store would stay in its node's
    scratch, so the driver writes the default store (``RUN_DIR/mlruns``) from the run's record instead.
    """
    from distributed_ft.runtime.tracking import tracker_scalars

    (run_dir / MLFLOW_RUN_FILE).unlink(missing_ok=True)  # one MLflow run per finished run
    tracker = MlflowTracker(run_dir, config)
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    for record in (json.loads(line) for line in lines if line.strip()):
        values = {k: v for k, v in record.items() if k not in ("event", "step", "time")}
        tracker.log(tracker_scalars(record["event"], values), record["step"], record["time"])
    for name in ("export", "report"):
        if (run_dir / name).is_dir():
            tracker.log_artifacts(run_dir / name)
    tracker.close("FINISHED")
    return tracker.run_id
