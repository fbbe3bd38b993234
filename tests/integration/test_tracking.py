"""track.*: TensorBoard event files and an MLflow run mirror metrics.jsonl; runs write their report."""

import json

import pytest

from distributed_ft.cli import main

STEPS = 8


def _overrides(tiny_bert, tiny_conll, tmp, name, *extra):
    return [
        f"model.name={tiny_bert}",
        *[f"data.{split}={path}" for split, path in tiny_conll.items()],
        f"data.cache_dir={tmp / 'cache'}",
        "data.max_train_samples=null",
        "data.max_eval_samples=null",
        "data.max_length=64",
        f"run.output_dir={tmp / name}",
        f"train.max_steps={STEPS}",
        "train.eval_every=4",
        "train.batch_size=16",
        "train.log_every=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(tiny_bert, tiny_conll, tmp_path_factory, one_torch_thread):
    """Two tiny NER runs: ``run-a`` with both trackers, ``run-b`` (another lr) with none."""
    tmp = tmp_path_factory.mktemp("tracking")
    tracked = ["train.lr=3e-3", "track.tensorboard=true", "track.mlflow=true", "track.mlflow_experiment=tiny"]
    assert (
        main(["-q", "train", "ner-conll2003", *_overrides(tiny_bert, tiny_conll, tmp, "run-a", *tracked)])
        == 0
    )
    assert (
        main(
            [
                "-q",
                "train",
                "ner-conll2003",
                *_overrides(tiny_bert, tiny_conll, tmp, "run-b", "train.lr=1e-3"),
            ]
        )
        == 0
    )
    return tmp / "run-a", tmp / "run-b"


def _events(run_dir, kind):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == kind]


def test_tensorboard_event_files_hold_the_logged_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_a, run_b = runs
    events = EventAccumulator(str(run_a / "tensorboard"))
    events.Reload()
    train = _events(run_a, "train")
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train], rel=1e-6)  # float32 in TB
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([r["lr"] for r in train], rel=1e-6)
    f1 = events.Scalars("eval/validation/f1")
    assert [(e.step, e.value) for e in f1] == [
        (r["step"], pytest.approx(r["f1"])) for r in _events(run_a, "eval")
    ]
    assert not (run_b / "tensorboard").exists() and not (run_b / "mlruns").exists()


def test_mlflow_store_holds_the_run_params_metrics_and_export(runs, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this
    run_a, _ = runs
    client = MlflowClient(tracking_uri=(run_a / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run-a"
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.lr"] == "0.003" and params["task"] == "token_classification"
    assert params["track.mlflow"] == "True" and params["run.output_dir"] == str(run_a)
    history = client.get_metric_history(run.info.run_id, "train/loss")
    train = _events(run_a, "train")
    assert sorted((m.step, m.value) for m in history) == [(r["step"], r["loss"]) for r in train]
    evals = client.get_metric_history(run.info.run_id, "eval/validation/f1")
    assert sorted((m.step, m.value) for m in evals) == [(r["step"], r["f1"]) for r in _events(run_a, "eval")]
    results = json.loads((run_a / "results.json").read_text())
    assert run.data.metrics["final/test/f1"] == results["test"]["f1"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"export", "report"} <= artifacts
    exported = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert "export/model.safetensors" in exported and "export/config.json" in exported


def test_each_run_writes_its_report(runs):
    for run_dir in runs:
        report = run_dir / "report"
        assert (report / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        series = json.loads((report / "series.json").read_text())
        assert series["train/loss"][run_dir.name]["value"] == [r["loss"] for r in _events(run_dir, "train")]


def test_dft_report_overlays_two_runs(runs, tmp_path, capsys):
    out = tmp_path / "compare"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.md")
    for name in ("loss.png", "lr.png", "tokens_per_s.png", "eval.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    series = json.loads((out / "series.json").read_text())  # read back from the plotted lines
    for run_dir in runs:
        train, evals = _events(run_dir, "train"), _events(run_dir, "eval")
        for key in ("loss", "lr", "tokens_per_s"):
            plotted = series[f"train/{key}"][run_dir.name]
            assert plotted == {"step": [r["step"] for r in train], "value": [r[key] for r in train]}
        plotted = series["eval/validation/f1"][run_dir.name]
        assert plotted == {"step": [r["step"] for r in evals], "value": [r["f1"] for r in evals]}
    report = (out / "report.md").read_text()
    results = json.loads((runs[0] / "results.json").read_text())
    assert "## run-a: test per type" in report and "## run-b: dev per type" in report
    assert f"| run-a | test | {results['test']['f1']:.4f} |" in report
    support = results["test"]["per_type"]["PER"]["support"]
    per = results["test"]["per_type"]["PER"]
    assert f"| PER | {per['precision']:.4f} | {per['recall']:.4f} | {per['f1']:.4f} | {support} |" in report
