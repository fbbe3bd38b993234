"""Shared fixtures: tiny BERT / Llama / CoNLL (``distributed_ft.testing``) and a local S3 server (moto)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed_ft.testing import make_conll, make_tiny_bert, make_tiny_llama


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_conll(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("conll")
    return {
        "train": make_conll(root / "train.conll", 240, seed=1),
        "validation": make_conll(root / "valid.conll", 60, seed=2),
        "test": make_conll(root / "test.conll", 60, seed=3),
    }


@pytest.fixture(scope="session")
def tiny_conll_train(tiny_conll):
    """The tiny corpus's training split as the token-tag reader gives it (a ``pyarrow.Table``)."""
    from distributed_ft.data.readers import read_token_tags

    return read_token_tags(str(tiny_conll["train"]))


@pytest.fixture
def tiny_job(tiny_bert, tiny_conll, tmp_path) -> list[str]:
    """Overrides for a fast NER job on the tiny model and corpus (a packaged recipe underneath)."""
    return [
        f"model.name={tiny_bert}",
        f"data.train={tiny_conll['train']}",
        f"data.validation={tiny_conll['validation']}",
        f"data.test={tiny_conll['test']}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_train_samples=null",
        "data.max_eval_samples=null",
        "data.max_length=64",
        f"run.output_dir={tmp_path / 'run'}",
        "run.progress=false",
        "track.report=false",  # test_tracking.py covers the report; it costs ~0.8 s a run
        "train.epochs=3",
        "train.batch_size=16",
        "train.lr=3e-3",
        "train.log_every=1",
    ]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


S3_BUCKET = "dft-test"
"""The bucket the ``s3_server`` fixture creates."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_server(tmp_path):
    """moto's S3 server on a free local port, stopped by its PID.

    Yields ``(AWS environment that reaches it, a boto3 client, the bucket it created)``.
    """
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
        client.create_bucket(Bucket=S3_BUCKET)
        yield env, client, S3_BUCKET
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models step ~20x faster on 1 intra-op thread than on 2 when the machine's cores are shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
