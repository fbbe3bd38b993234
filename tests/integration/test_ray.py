"""Ray Train on a local Ray: the run-directory contract, fault tolerance with exact resume, ray job submit."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("RAY_ADDRESS", None)


def _job(tiny_bert, tiny_conll, tmp: Path, run: str) -> list[str]:
    return [
        f"model.name={tiny_bert}",
        *[f"data.{split}={path}" for split, path in tiny_conll.items()],
        f"data.cache_dir={tmp / 'cache'}",
        "data.max_train_samples=null",
        "data.max_eval_samples=null",
        "data.max_length=64",
        f"run.output_dir={tmp / run}",
        "run.num_workers=2",
        "run.progress=false",
        "train.batch_size=4",
        "train.max_steps=40",
        "train.lr=3e-3",
        "train.log_every=1",
        "train.save_every=10",
        "train.eval_each_epoch=false",
        "run.engine=deepspeed",
        "deepspeed.zero_stage=2",
    ]


def _dft(*args: str, env=None) -> subprocess.Popen:
    return _dft_task("ner-conll2003", *args, env=env)


def _dft_task(recipe: str, *args: str, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "distributed_ft", "-q", "train", recipe, *args],
        env=env or ENV,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _train_losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["event"] == "train"]


@pytest.fixture(scope="module")
def ray_runs(tiny_bert, tiny_conll, tmp_path_factory):
    """An uninterrupted Ray run, a Ray run whose worker is SIGKILLed mid-training, and a torchrun run."""
    tmp = tmp_path_factory.mktemp("ray")
    job = lambda run: _job(tiny_bert, tiny_conll, tmp, run)  # noqa: E731
    straight = _dft(*job("straight"), "run.backend=ray", "track.mlflow=true", "track.tensorboard=true")
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out[-3000:]

    killed = _dft(*job("killed"), "run.backend=ray", "run.max_failures=2")
    victim = _kill_a_worker_after_first_checkpoint(tmp / "killed", killed)
    out, _ = killed.communicate(timeout=600)
    assert killed.returncode == 0, out[-3000:]

    torchrun = Path(sys.executable).with_name("torchrun")
    local = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "-m",
            "distributed_ft",
            "-q",
            "train",
            "ner-conll2003",
            *job("local"),
        ],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-2000:]
    return tmp, victim


def _kill_a_worker_after_first_checkpoint(run_dir: Path, job: subprocess.Popen) -> int:
    """Wait until Ray has committed step 10's checkpoint, then SIGKILL one Ray Train worker of ``job``."""
    # Ray's controller records the checkpoints it committed (every rank's shards in) in this snapshot
    snapshot = run_dir / "ray" / run_dir.name / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        assert job.poll() is None, "the job ended before a worker could be killed"
        if snapshot.is_file() and "step-0000010" in snapshot.read_text():
            break
        time.sleep(0.05)
    # only this job's workers: the job's local Ray (raylet and workers) descends from the dft process
    family = psutil.Process(job.pid).children(recursive=True)
    workers = [p for p in family if "RayTrainWorker" in " ".join(p.cmdline())]
    assert workers, "no Ray Train worker process found"
    workers[-1].send_signal(signal.SIGKILL)
    return workers[-1].pid


def test_ray_run_writes_the_run_directory_contract(ray_runs):
    tmp, _ = ray_runs
    run_dir = tmp / "straight"
    results = json.loads((run_dir / "results.json").read_text())
    assert {"f1", "precision", "recall", "per_type"} <= results["test"].keys()
    assert results["world_size"] == 2
    assert (run_dir / "config.yaml").is_file() and (run_dir / "export" / "config.json").is_file()
    losses = [loss for _, loss in _train_losses(run_dir)]
    assert [s for s, _ in _train_losses(run_dir)] == list(range(1, 41))
    assert sum(losses[-5:]) < sum(losses[:5])
    # checkpoints were persisted to Ray's storage too (the merged directory holds both ranks' shards)
    assert list((run_dir / "ray").rglob("rng-rank1.pt"))


def test_killed_worker_resumes_exactly_from_the_last_checkpoint(ray_runs):
    tmp, _ = ray_runs
    straight = dict(_train_losses(tmp / "straight"))
    history = _train_losses(tmp / "killed")
    steps = [s for s, _ in history]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    resumed_from = steps[restart] - 1
    assert resumed_from in (10, 20, 30)  # a checkpoint step: nothing before it is trained twice
    assert steps[restart:] == list(range(resumed_from + 1, 41))
    assert [loss for _, loss in history[restart:]] == [straight[s] for s in steps[restart:]]
    assert [loss for _, loss in history[:restart]] == [straight[s] for s in steps[:restart]]
    results = json.loads((tmp / "killed" / "results.json").read_text())
    assert results["steps"] == 40


def test_local_and_ray_runs_agree(ray_runs):
    tmp, _ = ray_runs
    ray_results = json.loads((tmp / "straight" / "results.json").read_text())
    local_results = json.loads((tmp / "local" / "results.json").read_text())
    assert [loss for _, loss in _train_losses(tmp / "local")] == pytest.approx(
        [loss for _, loss in _train_losses(tmp / "straight")], rel=1e-5
    )
    assert local_results["test"]["f1"] == pytest.approx(ray_results["test"]["f1"], abs=1e-6)


@pytest.fixture
def ray_head(s3_server):
    """``ray start --head --num-cpus=0`` (no training on the head) plus a second 2-CPU node, S3 on moto."""
    aws, _, bucket = s3_server
    ray = Path(sys.executable).with_name("ray")
    short = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's unix sockets need a short path
    # the head (and so every job's `python`) runs in this virtualenv, as on a provisioned cluster node
    env = {**ENV, **aws, "RAY_TMPDIR": short, "PATH": f"{ray.parent}:{ENV['PATH']}"}
    start = [
        str(ray),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        "--port=6390",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=0",
        "--disable-usage-stats",
        "--include-dashboard=true",
        f"--temp-dir={short}",
    ]
    worker = [str(ray), "start", "--address=127.0.0.1:6390", "--num-cpus=2", "--disable-usage-stats"]
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
        subprocess.run(worker, env=env, check=True, capture_output=True, timeout=180)
        yield {**env, "RAY_ADDRESS": "http://127.0.0.1:8265"}, bucket
    finally:
        _stop_processes_of(short)  # this cluster only: `ray stop` would end every Ray on the machine
        shutil.rmtree(short, ignore_errors=True)


def _stop_processes_of(temp_dir: str) -> None:
    """Terminate (then kill) the processes whose command line names ``temp_dir``: one Ray head's."""
    ours = [
        p
        for p in psutil.process_iter(["cmdline"])
        if any(temp_dir in part for part in p.info["cmdline"] or []) and p.pid != os.getpid()
    ]
    for process in ours:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(ours, timeout=20)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def test_ray_job_submit_launcher(ray_head, tiny_bert, tiny_conll, tmp_path):
    """``launchers/ray_submit.sh`` against a head without CPUs and a worker node; outputs in S3."""
    env, bucket = ray_head
    overrides = [
        a for a in _job(tiny_bert, tiny_conll, tmp_path, "submitted") if not a.startswith("train.max_steps")
    ]
    overrides += ["train.max_steps=6", "run.engine=torch"]
    without_storage = subprocess.run(  # two nodes, no run.storage_path: refused at start, with the fix
        [str(ROOT / "launchers" / "ray_submit.sh"), "ner-conll2003", *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert without_storage.returncode != 0
    assert "run.storage_path is not set" in without_storage.stdout + without_storage.stderr
    overrides += [f"run.storage_path=s3://{bucket}/submitted"]
    result = subprocess.run(
        [str(ROOT / "launchers" / "ray_submit.sh"), "ner-conll2003", *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    assert json.loads((tmp_path / "submitted" / "results.json").read_text())["steps"] == 6
    failing = subprocess.run(
        [
            str(ROOT / "launchers" / "ray_submit.sh"),
            "ner-conll2003",
            *overrides,
            "data.train=/nope/train.conll",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert failing.returncode != 0
    shutil.rmtree(tmp_path / "submitted", ignore_errors=True)


def _imbalanced_csv(path: Path, rows: int, seed: int) -> Path:
    """Sentences whose label is the kind of entity word in them; PER is rare (balanced weights matter)."""
    import random

    from distributed_ft.testing import ENTITY_WORDS, FILLER

    rng = random.Random(seed)
    lines = ["text,label"]
    for _ in range(rows):
        label = rng.choices(["LOC", "ORG", "PER"], weights=[6, 3, 1])[0]
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))] + [rng.choice(ENTITY_WORDS[label])]
        rng.shuffle(words)
        lines.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_balanced_class_weights_train_the_same_on_ray_workers_as_locally(tiny_bert, tmp_path):
    """Ray workers never run prepare_data: the weights reach them as task assets of the manifest."""
    common = [
        f"model.name={tiny_bert}",
        f"data.train={_imbalanced_csv(tmp_path / 'train.csv', 96, 1)}",
        "data.validation=null",
        "data.test=null",
        "data.text_column=text",
        "data.label_column=label",
        "data.class_weights=balanced",
        "data.max_train_samples=null",
        f"data.cache_dir={tmp_path / 'cache'}",
        "run.num_workers=2",
        "run.progress=false",
        "train.batch_size=8",
        "train.max_steps=2",
        "train.log_every=1",
    ]
    torchrun = Path(sys.executable).with_name("torchrun")
    launch = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "distributed_ft", "-q", "train"]
    local = subprocess.run(
        [*launch, "text-classification", *common, f"run.output_dir={tmp_path / 'local'}"],
        env={**ENV, "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-3000:]
    on_ray = _dft_task(
        "text-classification", *common, f"run.output_dir={tmp_path / 'ray'}", "run.backend=ray"
    )
    out, _ = on_ray.communicate(timeout=600)
    assert on_ray.returncode == 0, out[-3000:]
    first_local, first_ray = _train_losses(tmp_path / "local")[0], _train_losses(tmp_path / "ray")[0]
    assert first_ray == pytest.approx(first_local, rel=1e-6)
    manifest = next((tmp_path / "cache").glob("*/manifest.json"))
    weights = json.loads(manifest.read_text())["meta"]["class_weights"]
    assert max(weights) > 2 * min(weights)  # the weights are far from uniform: a dropped weight would show


def test_a_ray_run_is_in_mlflow_and_tensorboard_on_the_driver(ray_runs):
    """Default local MLflow store under Ray: the driver logs the run from its record (metrics.jsonl)."""
    import os

    from mlflow.tracking import MlflowClient

    tmp, _ = ray_runs
    run_dir = tmp / "straight"
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("distributed_ft").experiment_id])
    assert run.info.run_name == "straight" and run.info.status == "FINISHED"
    assert run.data.params["run.num_workers"] == "2"
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert history == _train_losses(run_dir)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "export" in artifacts
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))  # rank 0's, through storage
