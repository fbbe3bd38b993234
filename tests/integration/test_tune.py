"""``dft tune`` on a local Ray: 4 trials of a tiny NER job, ASHA stops some, best.yaml retrains the best."""

from __future__ import annotations

import csv
import itertools
import json
import os

import pytest
import yaml

from distributed_ft import cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SPACE = {
    "train.lr": {"loguniform": ["1e-5", 3e-3]},  # a string bound as YAML reads 1e-5
    "train.warmup_ratio": {"uniform": [0, 0.2]},
}


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs for this module only; shut down afterwards (never ``ray stop``)."""
    import ray

    address = os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if address is not None:
        os.environ["RAY_ADDRESS"] = address


def test_tune_stops_trials_early_and_best_config_reproduces(local_ray, tiny_job, tmp_path, one_torch_thread):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    run_dir = tmp_path / "tune"
    job = [
        *[o for o in tiny_job if not o.startswith("run.output_dir=")],
        f"run.output_dir={run_dir}",
        "train.epochs=2",  # 15 steps an epoch
        "train.eval_every=5",
        "train.eval_each_epoch=false",
        "eval.metric=loss",  # continuous: no ties at ASHA's rungs
        "run.num_threads=1",  # the trials' thread count, and the retrain's
    ]
    argv = ["-q", "tune", "ner-conll2003", *job, "--space", str(space), "--trials", "4"]
    assert cli.main([*argv, "--max-concurrent", "1", "--grace-period", "5", "--seed", "3"]) == 0

    with (run_dir / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and all(row["status"] == "ok" for row in rows)
    assert len({row["train.lr"] for row in rows}) == 4  # four sampled configs
    stopped = [row for row in rows if row["stopped_early"] == "True"]
    finished = [row for row in rows if row["stopped_early"] == "False"]
    assert stopped, "ASHA stopped no trial"
    assert finished, "ASHA stopped every trial"
    full = json.loads((run_dir / "trials" / finished[0]["trial"] / "results.json").read_text())["steps"]
    for row in finished:  # ran to the end: the table's best metric is results.json's dev metric
        results = json.loads((run_dir / "trials" / row["trial"] / "results.json").read_text())
        assert int(row["steps"]) == results["steps"] == full
        assert results["dev"]["loss"] == pytest.approx(float(row["best_loss"]), rel=1e-5)
    for row in stopped:  # stopped at a rung: fewer steps, no results.json, its last evaluation reported
        trial_dir = run_dir / "trials" / row["trial"]
        assert 5 <= int(row["steps"]) < full and not (trial_dir / "results.json").exists()
        events = [json.loads(line) for line in (trial_dir / "metrics.jsonl").read_text().splitlines()]
        assert max(e["step"] for e in events if e["event"] == "eval") == int(row["steps"])
    spans = []  # --max-concurrent 1: one trial at a time (its first to its last logged event)
    for row in rows:
        lines = (run_dir / "trials" / row["trial"] / "metrics.jsonl").read_text().splitlines()
        times = [json.loads(line)["time"] for line in lines]
        spans.append((min(times), max(times)))
    spans.sort()
    assert all(start > end for (_, end), (start, _) in itertools.pairwise(spans))
    best = min(finished, key=lambda row: float(row["best_loss"]))
    markdown = (run_dir / "results.md").read_text()
    assert f"Best trial: {best['trial']}" in markdown and markdown.count("| trial-") == 4

    best_yaml = yaml.safe_load((run_dir / "best.yaml").read_text())
    assert best_yaml["train"]["lr"] == pytest.approx(float(best["train.lr"]), rel=1e-5)
    assert best_yaml["run"]["output_dir"] is None and best_yaml["eval"]["metric"] == "loss"
    again = tmp_path / "again"
    assert cli.main(["-q", "train", str(run_dir / "best.yaml"), f"run.output_dir={again}"]) == 0
    retrained = json.loads((again / "results.json").read_text())
    trial = json.loads((run_dir / "trials" / best["trial"] / "results.json").read_text())
    assert retrained["dev"]["loss"] == pytest.approx(trial["dev"]["loss"], rel=1e-6, abs=1e-9)
    assert retrained["best_step"] == trial["best_step"] == int(best["best_step"])
