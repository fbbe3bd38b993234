"""runtime/trackers.py behind MetricsLogger: the MLflow run's status, resume, a missing package, failures."""

import json
import logging
import sys

import pytest

from distributed_ft.config import load_config
from distributed_ft.errors import ConfigError, Preempted
from distributed_ft.runtime.context import LocalContext
from distributed_ft.runtime.trackers import MlflowTracker, flatten
from distributed_ft.runtime.tracking import MetricsLogger, ends_trackers, tracker_scalars


@pytest.fixture
def mlflow_store(monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    def runs(run_dir):
        client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
        experiment = client.get_experiment_by_name("distributed_ft")
        return client, client.search_runs([experiment.experiment_id])

    return runs


def _config(run_dir, *extra):
    return load_config("ner-conll2003", [f"run.output_dir={run_dir}", "track.mlflow=true", *extra])[0]


def test_scalars_are_keyed_by_event_and_split():
    values = {"split": "test", "f1": 0.5, "entities": 3, "flag": True, "mode": "strict"}
    assert tracker_scalars("final", values) == {"final/test/f1": 0.5, "final/test/entities": 3.0}
    assert tracker_scalars("train", {"loss": 1.25, "epoch": 0}) == {"train/loss": 1.25, "train/epoch": 0.0}
    assert flatten({"a": {"b": 1, "c": {"d": [1]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1], "e": {}}


@pytest.mark.parametrize(
    ("error", "status"), [(RuntimeError("boom"), "FAILED"), (Preempted("stop"), "KILLED")]
)
def test_an_exception_ends_the_mlflow_run(tmp_path, mlflow_store, error, status):
    @ends_trackers
    def job():
        metrics = MetricsLogger(tmp_path, LocalContext(), _config(tmp_path))
        metrics.log("train", 1, loss=2.0)
        raise error

    with pytest.raises(type(error)):
        job()
    _, (run,) = mlflow_store(tmp_path)
    assert run.info.status == status and run.data.metrics == {"train/loss": 2.0}


def test_a_resumed_run_continues_its_mlflow_run(tmp_path, mlflow_store):
    first = MetricsLogger(tmp_path, LocalContext(), _config(tmp_path))
    first.log("train", 1, loss=2.0)
    first.close("KILLED")
    second = MetricsLogger(tmp_path, LocalContext(), _config(tmp_path, "run.resume=auto"))
    second.log("train", 2, loss=1.0)
    second.close()
    second.close("FAILED")  # a second close changes nothing
    client, (run,) = mlflow_store(tmp_path)
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [
        (1, 2.0),
        (2, 1.0),
    ]
    assert json.loads((tmp_path / "mlflow_run.json").read_text())["run_id"] == run.info.run_id


def test_without_mlflow_one_clear_error(tmp_path, monkeypatch):
    for name in ["mlflow", "mlflow.entities", "mlflow.exceptions", "mlflow.tracking"]:
        monkeypatch.setitem(sys.modules, name, None)  # import mlflow... raises ImportError
    with pytest.raises(
        ConfigError, match=r"track.mlflow=true needs MLflow: pip install distributed_ft\[tracking\]"
    ):
        MlflowTracker(tmp_path, _config(tmp_path))


def test_a_failing_tracker_is_dropped_and_the_jsonl_goes_on(tmp_path, caplog):
    class Broken:
        def log(self, scalars, step, timestamp):
            raise OSError("disk full")

        def close(self, status="FINISHED"):
            pass

    metrics = MetricsLogger(tmp_path, LocalContext(), trackers=[Broken()])
    logger = logging.getLogger("distributed_ft")
    logger.addHandler(caplog.handler)
    try:
        metrics.log("train", 1, loss=1.0)
        metrics.log("train", 2, loss=0.5)
    finally:
        logger.removeHandler(caplog.handler)
    assert metrics.trackers == []
    # one warning (caplog may see it twice: here and through the root logger); event 2 finds it gone
    assert set(caplog.messages) == {"Broken: log failed (disk full); it is off for the rest of the run"}
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_ray_storage_keeps_tensorboard_and_report_not_mlruns(tmp_path):
    from distributed_ft.runtime import storage

    run = tmp_path / "scratch"
    for name in ("tensorboard/events.out", "report/report.md", "mlruns/0/meta.yaml", "export/config.json"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(name)
    (run / "metrics.jsonl").write_text("{}\n")
    storage.persist_run(run, str(tmp_path / "store"), final=False)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["metrics.jsonl"]
    storage.persist_run(run, str(tmp_path / "store"), final=True)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        "export",
        "metrics.jsonl",
        "report",
        "tensorboard",
    ]
    storage.fetch_run(str(tmp_path / "store"), tmp_path / "driver")
    assert (tmp_path / "driver" / "report" / "report.md").read_text() == "report/report.md"
    assert (tmp_path / "driver" / "tensorboard" / "events.out").is_file()


def test_the_driver_replays_a_finished_run_into_mlflow(tmp_path, mlflow_store):
    """A Ray run with the default store: the driver logs the run from metrics.jsonl, as the loop would."""
    from distributed_ft.runtime.trackers import replay_mlflow

    records = [
        {"event": "train", "step": 1, "time": 100.0, "loss": 2.0, "lr": 1e-4},
        {"event": "train", "step": 2, "time": 101.0, "loss": 1.5, "lr": 2e-4},
        {"event": "eval", "step": 2, "time": 102.0, "split": "validation", "f1": 0.25},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    run_id = replay_mlflow(tmp_path, _config(tmp_path))
    client, (run,) = mlflow_store(tmp_path)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value, m.timestamp) for m in history] == [(1, 2.0, 100_000), (2, 1.5, 101_000)]
    assert run.data.metrics["eval/validation/f1"] == 0.25
    assert {a.path for a in client.list_artifacts(run_id)} == {"export"}
