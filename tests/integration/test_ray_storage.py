"""A 2-node Ray cluster on this machine whose nodes share no disk, with ``run.storage_path=s3://...``.

The head starts with ``num_cpus=0`` (Ray's advice for clusters: no training on the head); two worker nodes
each get one ``worker_slot`` (so the 2 Ray Train workers land on different nodes) and their own ``TMPDIR``
(their scratch run directories). S3 is moto's standalone server on 127.0.0.1, started and stopped by a
fixture (by PID). The job must succeed; ``results.json``, ``metrics.jsonl`` and an ``export/`` that plain
transformers loads are read from the bucket, and the nodes' scratch directories are gone afterwards. Then
the same job loses a worker node after its step-10 checkpoint and a new node joins: the run resumes from the
checkpoint in the bucket, its per-step losses after it equal the uninterrupted run's, and no step before it
is trained again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def two_node_cluster(tmp_path, s3_server):
    """A head without CPUs and two 2-CPU worker nodes with private scratch (TMPDIR); shut down after."""
    from ray.cluster_utils import Cluster

    env, _, _ = s3_server
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the raylets (and so the workers) inherit the S3 endpoint
    scratch = {name: tmp_path / f"scratch-{name}" for name in ("a", "b")}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        nodes = {name: _worker_node(cluster, directory) for name, directory in scratch.items()}
        cluster.wait_for_nodes()
        yield cluster, scratch, nodes
    finally:
        cluster.shutdown()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _worker_node(cluster, scratch: Path):
    """A 2-CPU node with one ``worker_slot`` and its own scratch directory (TMPDIR)."""
    scratch.mkdir(exist_ok=True)
    return cluster.add_node(num_cpus=2, resources={"worker_slot": 1}, env_vars={"TMPDIR": str(scratch)})


def _job(cluster, env, bucket, tiny_bert, tiny_conll, tmp_path, name: str, *extra: str) -> subprocess.Popen:
    args = [
        f"model.name={tiny_bert}",
        *[f"data.{split}={path}" for split, path in tiny_conll.items()],
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_length=64",
        f"run.output_dir={tmp_path / name}",
        "run.backend=ray",
        "run.num_workers=2",
        "run.resources_per_worker={CPU: 1, worker_slot: 1}",
        f"run.storage_path=s3://{bucket}/runs",
        f"run.ray_run_name={name}",
        "run.progress=false",
        "train.batch_size=4",
        "train.max_steps=30",
        "train.save_every=10",
        "train.eval_each_epoch=false",
        "train.log_every=1",
        "train.lr=3e-3",
        *extra,
    ]
    run_env = {
        **os.environ,
        **env,
        "RAY_ADDRESS": cluster.address,
        "RAY_AUTH_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "distributed_ft", "-q", "train", "ner-conll2003", *args],
        env=run_env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _losses(metrics: bytes) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in metrics.decode().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["event"] == "train"]


def test_two_nodes_without_a_shared_disk_write_to_the_bucket_and_survive_a_lost_node(
    two_node_cluster, s3_server, tiny_bert, tiny_conll, tmp_path
):
    cluster, scratch, nodes = two_node_cluster
    env, client, bucket = s3_server

    read, keys = _bucket(client, bucket)

    # 1. an uninterrupted run: everything a user keeps is in the bucket
    job = _job(cluster, env, bucket, tiny_bert, tiny_conll, tmp_path, "straight")
    out, _ = job.communicate(timeout=900)
    assert job.returncode == 0, out[-5000:]
    assert f"s3://{bucket}/runs/straight" in out
    results = json.loads(read("straight", "results.json"))
    assert results["world_size"] == 2 and results["steps"] == 30 and "f1" in results["test"]
    assert results["export"] == f"s3://{bucket}/runs/straight/export"  # not a worker's scratch path
    assert f"exported model: s3://{bucket}/runs/straight/export" in out
    local = tmp_path / "straight"  # the driver's copy: the run's files and export, no checkpoints
    assert (local / "results.json").is_file() and (local / "export" / "config.json").is_file()
    assert not list(local.glob("step-*")), sorted(p.name for p in local.iterdir())
    straight = dict(_losses(read("straight", "metrics.jsonl")))
    assert sorted(straight) == list(range(1, 31))
    assert any(k.endswith("export/model.safetensors") for k in keys("straight"))
    assert any("/step-0000030/run_state.json" in k for k in keys("straight"))  # checkpoints, by Ray

    export = tmp_path / "export-from-s3"
    export.mkdir()
    for key in keys("straight"):
        if "/export/" in key and not key.endswith("/"):  # "dir/" keys are directory markers
            (export / key.rsplit("/", 1)[1]).write_bytes(read("straight", key.split("straight/", 1)[1]))
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(export)
    assert model.config.num_labels == len(json.loads(read("straight", "labels.json")))
    for directory in scratch.values():  # each node's scratch run directory was used, then removed
        assert (directory / "dft-runs").is_dir(), sorted(p.name for p in directory.iterdir())
        assert not list((directory / "dft-runs").iterdir())
    assert json.loads((tmp_path / "straight" / "results.json").read_text()) == results  # the driver's copy
    evaluated = subprocess.run(  # dft evaluate reads the run straight from the bucket
        [sys.executable, "-m", "distributed_ft", "-q", "evaluate", f"s3://{bucket}/runs/straight", "--json"],
        env={**os.environ, **env, "XDG_CACHE_HOME": str(tmp_path / "xdg")},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads(evaluated.stdout[evaluated.stdout.index("{") :])
    assert metrics["f1"] == pytest.approx(results["test"]["f1"], abs=1e-9)

    # 2. the same job loses a node after its step-10 checkpoint; a new node joins; the run resumes
    job = _job(cluster, env, bucket, tiny_bert, tiny_conll, tmp_path, "lost-node", "run.max_failures=3")
    _wait_for_checkpoint(job, read, keys, "lost-node")
    cluster.remove_node(nodes["b"], allow_graceful=False)
    _worker_node(cluster, tmp_path / "scratch-c")
    out, _ = job.communicate(timeout=900)
    assert job.returncode == 0, out[-5000:]
    resumed = _after_restart(_losses(read("lost-node", "metrics.jsonl")))
    assert [loss for _, loss in resumed] == [straight[s] for s, _ in resumed]
    assert json.loads(read("lost-node", "results.json"))["steps"] == 30


def test_an_elastic_run_that_loses_a_node_finishes_on_the_worker_left(
    two_node_cluster, s3_server, tiny_bert, tiny_conll, tmp_path
):
    """``run.num_workers=[1, 2]`` on a fresh 2-node cluster (both worker slots free: 2 workers start) loses
    a node that nobody replaces after the step-10 checkpoint; the run continues on the one worker left
    (grad_accum 1 -> 2 keeps the global batch) and finishes."""
    cluster, _, nodes = two_node_cluster
    env, client, bucket = s3_server

    read, keys = _bucket(client, bucket)

    job = _job(cluster, env, bucket, tiny_bert, tiny_conll, tmp_path, "elastic", "run.num_workers=[1, 2]")
    _wait_for_checkpoint(job, read, keys, "elastic")
    cluster.remove_node(nodes["b"], allow_graceful=False)
    out, _ = job.communicate(timeout=900)
    assert job.returncode == 0, out[-5000:]
    assert "train.grad_accum 1 -> 2" in out, out[-5000:]  # the knob that moved, on the one worker left
    _after_restart(_losses(read("elastic", "metrics.jsonl")))
    elastic = json.loads(read("elastic", "results.json"))
    assert elastic["steps"] == 30 and elastic["world_size"] == 1


def _bucket(client, bucket: str):
    """``read(run, key)`` (an object's bytes) and ``keys(run)`` (its object keys) of runs under ``runs/``."""

    def read(run: str, key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=f"runs/{run}/{key}")["Body"].read()

    def keys(run: str) -> list[str]:
        listing = client.list_objects_v2(Bucket=bucket, Prefix=f"runs/{run}/")
        return [o["Key"] for o in listing.get("Contents", [])]

    return read, keys


def _wait_for_checkpoint(job: subprocess.Popen, read, keys, run: str) -> None:
    """Wait until Ray has committed ``run``'s step-10 checkpoint (its controller's snapshot names it)."""
    deadline = time.time() + 300
    while b"step-0000010" not in _snapshot(read, keys, run):
        assert job.poll() is None and time.time() < deadline, "no checkpoint before the job ended"
        time.sleep(0.2)


def _after_restart(history: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The records after the run restarted, checked to start right after a checkpoint and run to step 30."""
    steps = [s for s, _ in history]
    restart = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), None)
    assert restart is not None, f"the run never restarted: {steps}"
    resumed_from = steps[restart] - 1
    assert resumed_from in (10, 20), steps  # a checkpoint step: nothing before it is retrained
    assert steps[restart:] == list(range(resumed_from + 1, 31)), steps
    return history[restart:]


def _snapshot(read, keys, run: str) -> bytes:
    """Ray's record of the checkpoints it committed for ``run`` (empty before the first)."""
    if not any(k.endswith("checkpoint_manager_snapshot.json") for k in keys(run)):
        return b""
    return read(run, "checkpoint_manager_snapshot.json")
