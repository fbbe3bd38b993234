"""A 2-node Ray cluster on this machine whose nodes share no disk, with ``run.storage_path=s3://...``.

The head starts with ``num_cpus=0`` (Ray's advice for clusters: no training on the head); two worker nodes
each get one ``worker_slot`` (so the 2 Ray Train workers land on different nodes) and their own ``TMPDIR``
(their scratch run directories). S3 is moto's standalone server on 127.0.0.1, started and stopped by a
fixture (by PID). The job must succeed; ``results.json``, ``metrics.jsonl`` and an ``export/`` that plain
transformers loads are read from the bucket, and the nodes' scratch directories are gone afterwards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BUCKET = "dft-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_server(tmp_path):
    """moto's S3 server on a free local port; yields the AWS environment that reaches it."""
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, "moto_server did not start"
                time.sleep(0.2)
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        client.create_bucket(Bucket=BUCKET)
        yield env, client
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def two_node_cluster(tmp_path, s3_server):
    """A head without CPUs and two 2-CPU worker nodes with private scratch (TMPDIR); shut down after."""
    from ray.cluster_utils import Cluster

    env, _ = s3_server
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the raylets (and so the workers) inherit the S3 endpoint
    scratch = {name: tmp_path / f"scratch-{name}" for name in ("a", "b")}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for directory in scratch.values():
            directory.mkdir()
            cluster.add_node(num_cpus=2, resources={"worker_slot": 1}, env_vars={"TMPDIR": str(directory)})
        cluster.wait_for_nodes()
        yield cluster, scratch
    finally:
        cluster.shutdown()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_two_nodes_without_a_shared_disk_write_everything_to_the_bucket(
    two_node_cluster, s3_server, tiny_bert, tiny_conll, tmp_path
):
    cluster, scratch = two_node_cluster
    env, client = s3_server
    storage = f"s3://{BUCKET}/runs"
    args = [
        f"model.name={tiny_bert}",
        *[f"data.{split}={path}" for split, path in tiny_conll.items()],
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_length=64",
        f"run.output_dir={tmp_path / 'driver-copy'}",
        "run.backend=ray",
        "run.num_workers=2",
        "run.resources_per_worker={CPU: 1, worker_slot: 1}",
        f"run.storage_path={storage}",
        "run.ray_run_name=two-nodes",
        "run.progress=false",
        "train.batch_size=8",
        "train.max_steps=12",
        "train.save_every=6",
        "train.eval_each_epoch=false",
        "train.log_every=1",
        "train.lr=3e-3",
    ]
    run_env = {
        **os.environ,
        **env,
        "RAY_ADDRESS": cluster.address,
        "RAY_AUTH_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }
    done = subprocess.run(
        [sys.executable, "-m", "distributed_ft", "-q", "train", "ner-conll2003", *args],
        env=run_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert f"{storage}/two-nodes" in done.stderr

    def read(key: str) -> bytes:
        return client.get_object(Bucket=BUCKET, Key=f"runs/two-nodes/{key}")["Body"].read()

    results = json.loads(read("results.json"))
    assert results["world_size"] == 2 and results["steps"] == 12 and "f1" in results["test"]
    steps = [json.loads(line)["step"] for line in read("metrics.jsonl").decode().splitlines()]
    assert set(range(1, 13)) <= set(steps)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="runs/two-nodes/")["Contents"]]
    assert any(k.endswith("export/model.safetensors") for k in keys), keys
    assert any("/step-0000006/" in k for k in keys), keys  # checkpoints persisted by Ray

    export = tmp_path / "export-from-s3"
    export.mkdir()
    for key in keys:
        if "/export/" in key and not key.endswith("/"):  # "dir/" keys are directory markers
            (export / key.rsplit("/", 1)[1]).write_bytes(read(key.split("two-nodes/", 1)[1]))
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(export)
    assert model.config.num_labels == len(json.loads(read("labels.json")))
    for directory in scratch.values():  # each node's scratch run directory was used, then removed
        assert (directory / "dft-runs").is_dir(), sorted(p.name for p in directory.iterdir())
        assert not list((directory / "dft-runs").iterdir())
    # the driver's copy came from the bucket
    assert json.loads((tmp_path / "driver-copy" / "results.json").read_text()) == results
